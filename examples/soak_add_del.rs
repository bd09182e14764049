//! Soak: many ADD/DEL cycles of the exec'd `cnikit` plugin (bridge pod network, file
//! store) on one node whose `cnikit-agent` (host-gw) runs all along, as a runtime would run
//! them. Prints, after a warm-up and at the end, what must stay flat: the agent's resident
//! memory and open files, this driver's, the store's size and key count, the node's links
//! and the addresses in use. Not a test: it asserts only that every ADD and DEL succeeds and
//! that nothing is left allocated at the end.
//!
//! Needs root. Everything happens in namespaces it creates and removes, also on failure or
//! ctrl-c.
//!
//! ```text
//! cargo build --release --example cnikit --example cnikit-agent
//! cargo run --release --example soak_add_del -- --cycles 10000
//! ```

#[path = "bench_support/mod.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use cni_core::exec::Invocation;
use cni_core::ipam::{BlockIpam, BlockIpamConfig};
use cni_core::spec::Command;
use cni_core::store::{FileStore, Store};
use serde_json::json;
use support::{Lab, Node, ns_path};

#[derive(Parser)]
struct Args {
    /// ADD+DEL cycles.
    #[arg(long, default_value_t = 10_000)]
    cycles: usize,
    /// Cycles before the first measurement (caches, bridge, block claim).
    #[arg(long, default_value_t = 50)]
    warmup: usize,
    /// Print a progress line every this many cycles.
    #[arg(long, default_value_t = 1_000)]
    every: usize,
}

/// What is measured at a point of the soak.
#[derive(Debug, Clone, Copy)]
struct Sample {
    agent_rss_kib: u64,
    agent_fds: usize,
    driver_rss_kib: u64,
    driver_fds: usize,
    store_bytes: u64,
    store_keys: usize,
    node_links: usize,
    in_use: usize,
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")
}

fn fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

async fn sample(lab: &Lab, agent: u32, node: &Node, store_dir: &Path) -> Result<Sample> {
    let store = FileStore::new(store_dir);
    let keys = store.list("").await?;
    let engine = BlockIpam::new(
        store,
        BlockIpamConfig::new(support::POOL.parse()?, &node.name, "bench"),
    )?;
    let in_use = engine.allocations().await?.len();
    let problems = engine.audit().await?;
    ensure!(
        problems.is_empty(),
        "the store is inconsistent: {problems:?}"
    );
    let links = lab.output_in(&node.ns, {
        let mut c = std::process::Command::new("ip");
        c.args(["-o", "link", "show"]);
        c
    })?;
    Ok(Sample {
        agent_rss_kib: rss_kib(agent)?,
        agent_fds: fds(agent)?,
        driver_rss_kib: rss_kib(std::process::id())?,
        driver_fds: fds(std::process::id())?,
        store_bytes: std::fs::metadata(store_dir.join(cni_core::store::file::DATA_FILE))?.len(),
        store_keys: keys.len(),
        node_links: String::from_utf8_lossy(&links.stdout).lines().count(),
        in_use,
    })
}

fn print(label: &str, s: &Sample) {
    println!(
        "{label:<10} agent RSS {:>7} KiB, fds {:>3} | driver RSS {:>7} KiB, fds {:>3} | store {:>6} bytes, {:>3} keys | node links {:>2} | addresses in use {}",
        s.agent_rss_kib,
        s.agent_fds,
        s.driver_rss_kib,
        s.driver_fds,
        s.store_bytes,
        s.store_keys,
        s.node_links,
        s.in_use
    );
}

async fn cycle(config: &[u8], invocation: &Invocation, container: &str) -> Result<()> {
    let mut inv = invocation.clone();
    inv.container_id = container.to_owned();
    inv.with_command(Command::Add)
        .exec("cnikit", config)
        .await
        .with_context(|| format!("ADD {container}"))?;
    inv.with_command(Command::Del)
        .exec("cnikit", config)
        .await
        .with_context(|| format!("DEL {container}"))?;
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    // Dropping `run` on a signal drops its lab: the namespaces and the agent go with it.
    tokio::select! {
        result = run(&args) => result,
        () = support::interrupted() => bail!("interrupted; cleaned up"),
    }
}

async fn run(args: &Args) -> Result<()> {
    let plugin = support::binary("cnikit")?;
    let agent_bin = support::binary("cnikit-agent")?;
    let mut lab = Lab::new("soak")?;
    let underlay = lab.underlay("s", 1)?;
    let node = underlay.nodes[0].clone();
    let pod = lab.netns("pod")?;
    let store_dir = lab.store_dir();
    let list = support::conflist(
        &node,
        "host-gw",
        "bridge",
        support::file_store(&store_dir),
        json!({"resyncSeconds": 1}),
    );
    let agent = lab.start_agent(&agent_bin, &node, &list, "warn").await?;

    let plugins = lab.dir.path().join("bin");
    std::fs::create_dir_all(&plugins)?;
    std::os::unix::fs::symlink(&plugin, plugins.join("cnikit"))?;
    // The list's cnikit entry, as the runtime hands it to the plugin.
    let mut conf = list["plugins"][0].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    conf["name"] = list["name"].clone();
    let config = serde_json::to_vec(&conf)?;
    let invocation = Invocation::new(Command::Add, "", Some(ns_path(&pod)), "eth0", vec![plugins])
        .in_netns(ns_path(&node.ns));

    for i in 0..args.warmup {
        cycle(&config, &invocation, &format!("warm-{i}")).await?;
    }
    let start = sample(&lab, agent, &node, &store_dir).await?;
    print("start", &start);
    let began = Instant::now();
    for i in 0..args.cycles {
        cycle(&config, &invocation, &format!("soak-{i}")).await?;
        if (i + 1) % args.every == 0 {
            lab.check_alive(agent)?;
            let s = sample(&lab, agent, &node, &store_dir).await?;
            print(&format!("{}", i + 1), &s);
        }
    }
    let took = began.elapsed();
    // Let the agent see the last commits (it polls and resyncs every second).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let end = sample(&lab, agent, &node, &store_dir).await?;
    print("end", &end);
    println!(
        "{} ADD/DEL cycles in {:.0} s ({:.1} ms per cycle)",
        args.cycles,
        took.as_secs_f64(),
        took.as_secs_f64() * 1000.0 / args.cycles.max(1) as f64
    );
    println!(
        "change start -> end: agent RSS {:+} KiB, agent fds {:+}, driver RSS {:+} KiB, driver fds {:+}, store {:+} bytes, {:+} keys, node links {:+}",
        end.agent_rss_kib as i64 - start.agent_rss_kib as i64,
        end.agent_fds as i64 - start.agent_fds as i64,
        end.driver_rss_kib as i64 - start.driver_rss_kib as i64,
        end.driver_fds as i64 - start.driver_fds as i64,
        end.store_bytes as i64 - start.store_bytes as i64,
        end.store_keys as i64 - start.store_keys as i64,
        end.node_links as i64 - start.node_links as i64,
    );
    ensure!(end.in_use == 0, "{} addresses still in use", end.in_use);
    Ok(())
}
