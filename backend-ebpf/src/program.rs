//! Loading `bpf/pod.c`'s programs and attaching them: `from_pod` to a host veth,
//! `from_tunnel` and `to_tunnel` to the node's VXLAN device.
//!
//! Everything here is synchronous and resolves device names in the calling thread's
//! network namespace: [`crate::EbpfNetwork`] runs it on a thread inside the node namespace
//! ([`NetNs::run`](cni_core::linux::NetNs::run)), never on a runtime worker.
//!
//! Attachment: on kernels with TCX (6.6 and later) a TCX ingress link, pinned under the
//! network's bpffs directory so that it outlives the plugin process (removing the pin, or
//! the device, detaches it); on older kernels a `tc` filter `direct-action` on the device's
//! `clsact` ingress hook, which lives as long as the device.

use std::io;

use aya::programs::links::FdLink;
/// The tc hooks (`Ingress`, `Egress`), aya's.
pub use aya::programs::tc::TcAttachType;
use aya::programs::tc::{self, NlOptions, SchedClassifier, TcAttachOptions};
use aya::programs::{LinkOrder, ProgramError};
use aya::util::KernelVersion;
use aya::{Ebpf, EbpfLoader};

use crate::error::{Error, Result};
use crate::maps::Pins;

/// The compiled `bpf/pod.c` (built by `scripts/bpf.sh`, checked by `scripts/test.sh`).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!("../bpf/pod.bpf.o");
/// The object's name in errors.
const OBJECT_NAME: &str = "bpf/pod.bpf.o";
/// The program on each host veth's ingress (packets from the pod).
pub const PROGRAM: &str = "from_pod";
/// The program on the VXLAN device's ingress (packets from other nodes).
pub const FROM_TUNNEL: &str = "from_tunnel";
/// The program on the VXLAN device's egress (packets the node's stack routes into it).
pub const TO_TUNNEL: &str = "to_tunnel";

/// How a program ended up attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// A TCX ingress link, pinned.
    Tcx {
        /// The kernel's id of the link.
        link_id: u32,
        /// The kernel's id of the program.
        program_id: u32,
    },
    /// A `tc` filter on the `clsact` ingress hook (kernels without TCX).
    Tc {
        /// The kernel's id of the program.
        program_id: u32,
    },
}

/// Whether this kernel has TCX (Linux 6.6).
pub fn has_tcx() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

fn program_err(
    device: &str,
    what: &'static str,
    e: impl std::error::Error + Send + Sync + 'static,
) -> Error {
    named_err(PROGRAM, device, what, e)
}

fn named_err(
    program: &'static str,
    device: &str,
    what: &'static str,
    e: impl std::error::Error + Send + Sync + 'static,
) -> Error {
    Error::Program {
        program,
        device: device.to_owned(),
        what,
        source: Box::new(e),
    }
}

/// Loads the object with its maps pinned under `pins` (opened when pinned already, else
/// created and pinned).
pub fn load(pins: &Pins) -> Result<Ebpf> {
    pins.create()?;
    let endpoints = pins.endpoints();
    let counters = pins.counters();
    let remotes = pins.remotes();
    let tunnel = pins.tunnel();
    let try_load = || {
        EbpfLoader::new()
            .map_pin_path("endpoints", endpoints.as_path())
            .map_pin_path("counters", counters.as_path())
            .map_pin_path("remotes", remotes.as_path())
            .map_pin_path("tunnel", tunnel.as_path())
            .load(OBJECT)
    };
    // Two plugins may race to create a map: the loser's pin fails with EEXIST, and a
    // second try opens the winner's.
    try_load().or_else(|_| try_load()).map_err(|e| Error::Load {
        object: OBJECT_NAME,
        source: Box::new(e),
    })
}

/// Loads [`PROGRAM`] (the verifier runs here) and attaches it to the ingress of `device`
/// (TCX with a pinned link where the kernel has it, else `tc` on `clsact`).
pub fn attach(pins: &Pins, device: &str) -> Result<Attached> {
    let mut ebpf = load(pins)?;
    attach_one(
        &mut ebpf,
        PROGRAM,
        device,
        TcAttachType::Ingress,
        &pins.link(device),
    )
}

/// Loads [`FROM_TUNNEL`] and [`TO_TUNNEL`] and attaches them to the ingress and egress of
/// the VXLAN device `device`, replacing those an earlier agent attached (its pinned TCX
/// links, or its tc filters of the same names). Returns (ingress, egress).
pub fn attach_tunnel(pins: &Pins, device: &str) -> Result<(Attached, Attached)> {
    let mut ebpf = load(pins)?;
    let ingress = attach_one(
        &mut ebpf,
        FROM_TUNNEL,
        device,
        TcAttachType::Ingress,
        &pins.tunnel_link("ingress"),
    )?;
    let egress = attach_one(
        &mut ebpf,
        TO_TUNNEL,
        device,
        TcAttachType::Egress,
        &pins.tunnel_link("egress"),
    )?;
    Ok((ingress, egress))
}

/// Removes the pinned TCX links of the VXLAN device's programs (detaching them). The tc
/// filters of kernels without TCX go with the device.
pub fn detach_tunnel(pins: &Pins) -> Result<()> {
    Pins::unpin(pins.tunnel_link("ingress"))?;
    Pins::unpin(pins.tunnel_link("egress"))?;
    Ok(())
}

/// Loads program `name` of `ebpf` and attaches it to `device` in `direction`: TCX with its
/// link pinned at `pin` (replacing what was pinned there), else a tc filter on `clsact`
/// (replacing filters of programs with the same name).
fn attach_one(
    ebpf: &mut Ebpf,
    name: &'static str,
    device: &str,
    direction: TcAttachType,
    pin: &std::path::Path,
) -> Result<Attached> {
    let program: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or_else(|| {
            named_err(
                name,
                device,
                "find in the object",
                ProgramError::UnexpectedProgramType,
            )
        })?
        .try_into()
        .map_err(|e| named_err(name, device, "open as a tc classifier", e))?;
    program
        .load()
        .map_err(|e| named_err(name, device, "load (verifier)", e))?;
    let program_id = program
        .info()
        .map_err(|e| named_err(name, device, "read info", e))?
        .id();

    if has_tcx() {
        let id = program
            .attach_with_options(
                device,
                direction,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(|e| named_err(name, device, "attach (tcx)", e))?;
        let link = program
            .take_link(id)
            .map_err(|e| named_err(name, device, "take the link", e))?;
        let link =
            FdLink::try_from(link).map_err(|e| named_err(name, device, "take the TCX link", e))?;
        let link_id = link
            .info()
            .map_err(|e| named_err(name, device, "read link info", e))?
            .id();
        // What is pinned there is stale: an earlier pod's veth of this name (its DEL
        // never ran), or the program an earlier agent attached, which this one replaces.
        Pins::unpin(pin.to_path_buf())?;
        link.pin(pin).map_err(|e| Error::Pin {
            what: "pin link",
            path: pin.to_path_buf(),
            source: io::Error::other(e),
        })?;
        Ok(Attached::Tcx {
            link_id,
            program_id,
        })
    } else {
        match tc::qdisc_add_clsact(device) {
            Ok(()) => {}
            Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(named_err(name, device, "tc qdisc add clsact", e)),
        }
        if name != PROGRAM {
            // An earlier agent's filter (a pod's veth is new: it has none).
            match tc::qdisc_detach_program(device, direction, name) {
                Ok(()) => {}
                Err(e) => tracing::debug!(error = %e, device, name, "no earlier filter"),
            }
        }
        let id = program
            .attach_with_options(
                device,
                direction,
                TcAttachOptions::Netlink(NlOptions::default()),
            )
            .map_err(|e| named_err(name, device, "attach (tc clsact)", e))?;
        let link = program
            .take_link(id)
            .map_err(|e| named_err(name, device, "take the link", e))?;
        // Dropping the link would delete the filter: it belongs to the device now and goes
        // with it. (The handle holds no descriptor; forgetting it leaks a few bytes of a
        // process that is about to exit, or once per start of an agent.)
        std::mem::forget(link);
        Ok(Attached::Tc { program_id })
    }
}

/// The programs attached to the TCX ingress of `device`: (program id, name). `None` on a
/// kernel without TCX.
pub fn tcx_programs(device: &str) -> Result<Option<Vec<(u32, String)>>> {
    tcx_programs_on(device, TcAttachType::Ingress)
}

/// The programs attached to the TCX hook `direction` of `device`: (program id, name).
/// `None` on a kernel without TCX.
pub fn tcx_programs_on(
    device: &str,
    direction: TcAttachType,
) -> Result<Option<Vec<(u32, String)>>> {
    if !has_tcx() {
        return Ok(None);
    }
    let (_, programs) = SchedClassifier::query_tcx(device, direction)
        .map_err(|e| program_err(device, "query tcx", e))?;
    Ok(Some(
        programs
            .iter()
            .map(|p| (p.id(), p.name_as_str().unwrap_or_default().to_owned()))
            .collect(),
    ))
}

/// The ids of the maps program `id` uses, `None` when no such program is loaded.
pub fn program_maps(id: u32) -> Result<Option<Vec<u32>>> {
    for info in aya::programs::loaded_programs() {
        let info = info.map_err(|e| program_err("-", "list loaded programs", e))?;
        if info.id() == id {
            let maps = info
                .map_ids()
                .map_err(|e| program_err("-", "read the program's maps", e))?;
            return Ok(Some(maps.unwrap_or_default()));
        }
    }
    Ok(None)
}

/// The program id of the pinned TCX link of `device`, `None` when nothing is pinned.
pub fn pinned_link_program(pins: &Pins, device: &str) -> Result<Option<u32>> {
    let path = pins.link(device);
    if !path.exists() {
        return Ok(None);
    }
    let link = aya::programs::links::PinnedLink::from_pin(&path)
        .map_err(|e| program_err(device, "open the pinned link", e))?;
    let info = FdLink::from(link)
        .info()
        .map_err(|e| program_err(device, "read link info", e))?;
    Ok(Some(info.program_id()))
}
