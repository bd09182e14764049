//! Benchmark: wall time of ADD + DEL of the exec'd `cnikit` plugin (bridge pod network, local
//! file store) against the reference `bridge` + `host-local` plugins, alternated in the same
//! run so both see the same machine load. Prints medians and the ratio ours / reference.
//!
//! Needs root and the reference plugins (Debian containernetworking-plugins, /usr/lib/cni).
//! Everything happens in network namespaces this program creates and removes, also on
//! failure or ctrl-c.
//!
//! ```text
//! cargo build --release --example cnikit
//! cargo run --release --example bench_add_del -- --rounds 100
//! ```

#[path = "bench_support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use cni_core::exec::Invocation;
use cni_core::spec::Command;
use support::{Lab, ns_path};

#[derive(Parser)]
struct Args {
    /// ADD+DEL rounds per plugin.
    #[arg(long, default_value_t = 60)]
    rounds: usize,
    /// Where the reference plugins are.
    #[arg(long, default_value = "/usr/lib/cni")]
    reference: PathBuf,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn add_del(
    plugin: &str,
    config: &[u8],
    invocation: &Invocation,
    container: &str,
) -> Result<(Duration, Duration)> {
    let mut inv = invocation.clone();
    inv.container_id = container.to_owned();
    let start = Instant::now();
    inv.with_command(Command::Add)
        .exec(plugin, config)
        .await
        .with_context(|| format!("{plugin} ADD"))?;
    let add = start.elapsed();
    let start = Instant::now();
    inv.with_command(Command::Del)
        .exec(plugin, config)
        .await
        .with_context(|| format!("{plugin} DEL"))?;
    Ok((add, start.elapsed()))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    // Dropping `run` on a signal drops its lab: the namespaces go with it.
    tokio::select! {
        result = run(&args) => result,
        () = support::interrupted() => bail!("interrupted; cleaned up"),
    }
}

async fn run(args: &Args) -> Result<()> {
    let ours = support::binary("cnikit")?;
    for p in ["bridge", "host-local"] {
        ensure!(
            args.reference.join(p).is_file(),
            "reference plugin {p} missing"
        );
    }

    let mut lab = Lab::new("adddel")?;
    let node = lab.netns("node")?;
    let pod = lab.netns("pod")?;
    let state = lab.dir.path().to_path_buf();
    let plugins = state.join("bin");
    std::fs::create_dir_all(&plugins)?;
    std::os::unix::fs::symlink(&ours, plugins.join("cnikit"))?;

    let ours_conf = serde_json::json!({
        "cniVersion": "1.0.0", "name": "bench-ours", "type": "cnikit",
        "podNetwork": "bridge", "bridge": "cnikitb0",
        "dataDir": state.join("ours"), "nodeName": "bench",
        "ipam": {"type": "cnikit-ipam", "pool": "10.96.0.0/16"}
    });
    let ref_conf = serde_json::json!({
        "cniVersion": "1.0.0", "name": "bench-ref", "type": "bridge",
        "bridge": "refbr0", "isGateway": true,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.95.0.0/16"}]],
                 "dataDir": state.join("ref")}
    });
    let (ours_conf, ref_conf) = (
        serde_json::to_vec(&ours_conf)?,
        serde_json::to_vec(&ref_conf)?,
    );
    let invocation = Invocation::new(
        Command::Add,
        "",
        Some(ns_path(&pod)),
        "eth0",
        vec![plugins.clone(), args.reference.clone()],
    )
    .in_netns(ns_path(&node));

    // The kernel floor: creating and deleting one veth pair (host end in the node, peer in
    // the pod) in-process, with nothing else; every plugin pays at least this.
    let node_ns = cni_core::linux::NetNs::named(&node).await?;
    let pod_ns = cni_core::linux::NetNs::named(&pod).await?;
    let floor = || async {
        let spec = cni_core::linux::veth::VethSpec {
            host_name: "cnkfloor0",
            pod_name: "floor0",
            mtu: 1500,
            host_mac: None,
            host_controller: None,
            host_up: true,
        };
        let start = Instant::now();
        cni_core::linux::veth::create(&node_ns, &pod_ns, &spec).await?;
        let add = start.elapsed();
        let start = Instant::now();
        cni_core::linux::link::delete(&node_ns, "cnkfloor0").await?;
        anyhow::Ok((add, start.elapsed()))
    };

    // Warm up both (bridge creation, page cache), then alternate.
    add_del("cnikit", &ours_conf, &invocation, "warm-ours").await?;
    add_del("bridge", &ref_conf, &invocation, "warm-ref").await?;
    let (mut ours_add, mut ours_del, mut ref_add, mut ref_del) = (vec![], vec![], vec![], vec![]);
    let (mut ours_total, mut ref_total) = (vec![], vec![]);
    let (mut floor_add, mut floor_del) = (vec![], vec![]);
    for round in 0..args.rounds {
        let (a, d) = add_del("cnikit", &ours_conf, &invocation, &format!("ours-{round}")).await?;
        ours_add.push(a);
        ours_del.push(d);
        ours_total.push(a + d);
        let (a, d) = add_del("bridge", &ref_conf, &invocation, &format!("ref-{round}")).await?;
        ref_add.push(a);
        ref_del.push(d);
        ref_total.push(a + d);
        let (a, d) = floor().await?;
        floor_add.push(a);
        floor_del.push(d);
    }
    let (oa, od, ot) = (median(ours_add), median(ours_del), median(ours_total));
    let (ra, rd, rt) = (median(ref_add), median(ref_del), median(ref_total));
    println!(
        "ADD+DEL of the exec'd plugin, median of {} alternated rounds",
        args.rounds
    );
    println!(
        "{:<34} {:>9} {:>9} {:>11}",
        "", "ADD ms", "DEL ms", "ADD+DEL ms"
    );
    println!(
        "{:<34} {:>9.2} {:>9.2} {:>11.2}",
        "cnikit (bridge, file store)",
        ms(oa),
        ms(od),
        ms(ot)
    );
    println!(
        "{:<34} {:>9.2} {:>9.2} {:>11.2}",
        "reference bridge + host-local",
        ms(ra),
        ms(rd),
        ms(rt)
    );
    let (fa, fd) = (median(floor_add), median(floor_del));
    println!(
        "{:<34} {:>9.2} {:>9.2} {:>11.2}",
        "kernel floor (veth add/del only)",
        ms(fa),
        ms(fd),
        ms(fa + fd)
    );
    println!(
        "ratio cnikit / reference: ADD {:.2}, DEL {:.2}, ADD+DEL {:.2} (goal <= 0.33)",
        ms(oa) / ms(ra),
        ms(od) / ms(rd),
        ms(ot) / ms(rt)
    );
    println!(
        "above the kernel floor: cnikit {:.2} ms, reference {:.2} ms, ratio {:.2}",
        ms(ot) - ms(fa + fd),
        ms(rt) - ms(fa + fd),
        (ms(ot) - ms(fa + fd)) / (ms(rt) - ms(fa + fd))
    );
    Ok(())
}
