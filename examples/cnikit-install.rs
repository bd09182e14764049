//! `cnikit-install`: installs the `cnikit` plugin and the network's conflist on a node, as the
//! init container of cnikit's DaemonSet runs it (see `deploy/`), or by hand:
//!
//! ```text
//! sudo target/release/examples/cnikit-install \
//!     --plugin target/release/examples/cnikit \
//!     --template examples/conf/10-cnikit-routed.conflist --node-name "$(hostname)"
//! ```
//!
//! Files are replaced atomically (write, sync, rename) and left alone when unchanged. In a
//! pod whose IPAM store is `kubernetes`, the service account's token becomes a kubeconfig for
//! the plugin (`--service-account-dir`, the API server from `KUBERNETES_SERVICE_HOST` and
//! `KUBERNETES_SERVICE_PORT`). Prints one line per file; exits non-zero, having written
//! nothing half-way, on any error. With `--watch SECONDS` it stays and installs again every
//! SECONDS (the DaemonSet's `cni-refresh` container): a rotated token or certificate reaches
//! the plugin, a removed file comes back, and nothing unchanged is rewritten.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use nix::sys::signal::{SigSet, Signal};

use cnikit::install::{Install, Installed, ServiceAccount, install};

#[derive(Clone, Parser)]
#[command(
    name = "cnikit-install",
    about = "install the cnikit CNI plugin and its conflist on this node"
)]
struct Args {
    /// The plugin binary to install. Default: `cnikit` next to this program.
    #[arg(long)]
    plugin: Option<PathBuf>,
    /// The configuration list template (one `cnikit` entry).
    #[arg(long, default_value = "/etc/cnikit/cni.conflist")]
    template: PathBuf,
    /// The runtime's plugin directory as seen here.
    #[arg(long, default_value = "/opt/cni/bin")]
    bin_dir: PathBuf,
    /// The runtime's configuration directory as seen here.
    #[arg(long, default_value = "/etc/cni/net.d")]
    conf_dir: PathBuf,
    /// The configuration directory as the host sees it (when mounted elsewhere here).
    #[arg(long)]
    host_conf_dir: Option<PathBuf>,
    /// The installed conflist's file name.
    #[arg(long, default_value = "10-cnikit.conflist")]
    file_name: String,
    /// This node's name (the conflist's `nodeName`); also read from NODE_NAME.
    #[arg(long)]
    node_name: Option<String>,
    /// Where the pod's service account is mounted.
    #[arg(long, default_value = "/var/run/secrets/kubernetes.io/serviceaccount")]
    service_account_dir: PathBuf,
    /// Copy the files an etcd store names (from a mounted Secret) next to the conflist.
    #[arg(long)]
    copy_etcd_credentials: bool,
    /// Keep running and install again every SECONDS, writing only what changed: a token that
    /// kubelet rotated reaches the plugin's kubeconfig, a removed conflist comes back. Ends on
    /// SIGTERM or SIGINT.
    #[arg(long, value_name = "SECONDS")]
    watch: Option<u64>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    // Before any thread starts, so that every thread has them blocked and only the waiter
    // below takes them.
    let stop = args.watch.map(|_| stop_on_signal()).transpose()?;
    let spec = spec(args.clone())?;
    report(&install(&spec)?, true);
    let (Some(seconds), Some(stop)) = (args.watch, stop) else {
        return Ok(());
    };
    loop {
        if stop
            .recv_timeout(Duration::from_secs(seconds.max(1)))
            .is_ok()
        {
            return Ok(());
        }
        // A failure now (a token file being swapped by kubelet) is reported and tried again
        // at the next round; what is installed stays whole.
        match install(&spec) {
            Ok(installed) => report(&installed, false),
            Err(e) => eprintln!("error: {e}"),
        }
    }
}

/// What to install, from the flags and the environment.
fn spec(args: Args) -> Result<Install> {
    let plugin = match args.plugin {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("cnikit"),
    };
    // In a pod the API server is announced through these two variables, as client-go reads them.
    let service_account = match (
        std::env::var("KUBERNETES_SERVICE_HOST"),
        std::env::var("KUBERNETES_SERVICE_PORT"),
    ) {
        (Ok(host), Ok(port)) if args.service_account_dir.is_dir() => Some(ServiceAccount {
            dir: args.service_account_dir,
            server: format!("https://{}", join_host_port(&host, &port)),
        }),
        _ => None,
    };
    Ok(Install {
        plugin,
        plugin_name: "cnikit".into(),
        bin_dir: args.bin_dir,
        conf_dir: args.conf_dir,
        host_conf_dir: args.host_conf_dir,
        template: args.template,
        file_name: args.file_name,
        node_name: args.node_name.or_else(|| std::env::var("NODE_NAME").ok()),
        service_account,
        copy_etcd_credentials: args.copy_etcd_credentials,
    })
}

/// One line per file written; on the first run also the files left as they were, and a
/// warning for each configuration file that sorts before ours.
fn report(installed: &Installed, first: bool) {
    for path in &installed.written {
        println!("installed {}", path.display());
    }
    if !first {
        return;
    }
    for path in [&installed.binary, &installed.conflist] {
        if !installed.written.contains(path) {
            println!("unchanged {}", path.display());
        }
    }
    for other in &installed.shadowed_by {
        eprintln!(
            "warning: {} sorts before {} and is the one a runtime uses",
            other.display(),
            installed.conflist.display()
        );
    }
}

/// Blocks SIGTERM and SIGINT in this thread (and so in every thread started after) and
/// returns a channel that receives once either arrives.
fn stop_on_signal() -> Result<mpsc::Receiver<()>> {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block()?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        if signals.wait().is_ok() {
            let _ = tx.send(());
        }
    });
    Ok(rx)
}

/// `host:port`, with brackets around an IPv6 host.
fn join_host_port(host: &str, port: &str) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}
