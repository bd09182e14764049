//! Loading `bpf/pod.c`'s program and attaching it to a host veth.
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
use aya::programs::tc::{self, NlOptions, SchedClassifier, TcAttachOptions, TcAttachType};
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
    Error::Program {
        program: PROGRAM,
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
    let try_load = || {
        EbpfLoader::new()
            .map_pin_path("endpoints", endpoints.as_path())
            .map_pin_path("counters", counters.as_path())
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
    let program: &mut SchedClassifier = ebpf
        .program_mut(PROGRAM)
        .ok_or_else(|| {
            program_err(
                device,
                "find in the object",
                ProgramError::UnexpectedProgramType,
            )
        })?
        .try_into()
        .map_err(|e| program_err(device, "open as a tc classifier", e))?;
    program
        .load()
        .map_err(|e| program_err(device, "load (verifier)", e))?;
    let program_id = program
        .info()
        .map_err(|e| program_err(device, "read info", e))?
        .id();

    if has_tcx() {
        let id = program
            .attach_with_options(
                device,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(|e| program_err(device, "attach (tcx ingress)", e))?;
        let link = program
            .take_link(id)
            .map_err(|e| program_err(device, "take the link", e))?;
        let link =
            FdLink::try_from(link).map_err(|e| program_err(device, "take the TCX link", e))?;
        let link_id = link
            .info()
            .map_err(|e| program_err(device, "read link info", e))?
            .id();
        // A pin left by an earlier pod whose veth had this name (its DEL never ran) is
        // stale: this ADD has just created the device.
        pins.unpin_link(device)?;
        let path = pins.link(device);
        link.pin(&path).map_err(|e| Error::Pin {
            what: "pin link",
            path,
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
            Err(e) => return Err(program_err(device, "tc qdisc add clsact", e)),
        }
        let id = program
            .attach_with_options(
                device,
                TcAttachType::Ingress,
                TcAttachOptions::Netlink(NlOptions::default()),
            )
            .map_err(|e| program_err(device, "attach (tc clsact ingress)", e))?;
        let link = program
            .take_link(id)
            .map_err(|e| program_err(device, "take the link", e))?;
        // Dropping the link would delete the filter: it belongs to the device now and goes
        // with it. (The handle holds no descriptor; forgetting it leaks a few bytes of a
        // process that is about to exit.)
        std::mem::forget(link);
        Ok(Attached::Tc { program_id })
    }
}

/// The programs attached to the TCX ingress of `device`: (program id, name). `None` on a
/// kernel without TCX.
pub fn tcx_programs(device: &str) -> Result<Option<Vec<(u32, String)>>> {
    if !has_tcx() {
        return Ok(None);
    }
    let (_, programs) = SchedClassifier::query_tcx(device, TcAttachType::Ingress)
        .map_err(|e| program_err(device, "query tcx ingress", e))?;
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
