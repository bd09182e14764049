//! The `cnikit-agent` node agent: one per node, next to the `cnikit` plugin.
//!
//! It reads the network's configuration list (the one the runtime gives the plugin), registers
//! the node, claims its block, sets up the routing mode named by the `cnikit` entry's
//! `routing` key (`host-gw`, `vxlan`, `ipip`, `bgp`, `ebpf`), keeps the routes to every peer's blocks in line, and
//! writes the node state file the plugin waits for. SIGTERM or SIGINT stop it cleanly: it
//! deregisters and removes what it made.
//!
//! Needs root (it programs the node's routes); in a container, CAP_NET_ADMIN (and
//! CAP_NET_BIND_SERVICE for BGP's port 179) in the node's network namespace are enough, as
//! the DaemonSets of `deploy/` give it. Build and run:
//!
//! ```text
//! cargo build --release --example cnikit-agent
//! sudo target/release/examples/cnikit-agent --conflist /etc/cni/net.d/10-cnikit.conflist
//! ```

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "cnikit-agent",
    about = "cnikit node agent: registers the node and routes to its peers"
)]
struct Args {
    /// The network's CNI configuration list (with a `cnikit` entry that sets `routing`).
    #[arg(long)]
    conflist: PathBuf,
    /// This node's name, over the entry's `nodeName` (which defaults to the host name); also
    /// read from NODE_NAME, as a DaemonSet sets it from `spec.nodeName`.
    #[arg(long)]
    node_name: Option<String>,
    /// Log filter (`info`, `debug`, `cni_core=debug`…); also read from CNIKIT_LOG.
    #[arg(long, default_value = "info")]
    log: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let filter = std::env::var("CNIKIT_LOG").unwrap_or(args.log);
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(filter)?)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    // One thread: the agent waits on the datastore and the kernel, and stays small.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // Handlers first: a SIGTERM that comes while the node is still coming up must stop
        // the agent cleanly too, not kill it with half its entries in place.
        let shutdown = shutdown()?;
        let list = cnikit::agent::read_conflist(&args.conflist)?;
        let mut entry = cnikit::agent::cnikit_entry(&list)?;
        if let Some(node) = args.node_name.or_else(|| std::env::var("NODE_NAME").ok()) {
            entry.plugin.insert("nodeName".into(), node.into());
        }
        let agent = cnikit::agent::build(&entry, std::path::Path::new("/proc/self/ns/net"))
            .await
            .context("configuring the node agent")?;
        agent.run(shutdown).await.context("node agent")?;
        Ok(())
    })
}

/// Installs the SIGTERM and SIGINT handlers now; the future resolves on either.
fn shutdown() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
        }
    })
}
