//! Installing the plugin on a node, as a DaemonSet's init container does: the `cnikit`
//! binary into the runtime's plugin directory (`/opt/cni/bin`) and the network's
//! configuration list into its configuration directory (`/etc/cni/net.d`).
//!
//! Every file is written to a temporary name in its destination directory, synced, given its
//! mode and then renamed over the old one, so a runtime that reads the directory at any moment
//! sees either the old file or the new one, never half of one (a half-written conflist makes a
//! runtime fail every pod; a half-written binary crashes every call). A file whose content is
//! already the one to install is left alone (its mtime does not change, no runtime reloads).
//!
//! The configuration list comes from a template (a ConfigMap in a cluster) shared by every
//! node: the installer checks it, sets the `cnikit` entry's `nodeName` to this node and, when
//! the IPAM's datastore is the Kubernetes API (`"store": {"type": "kubernetes"}`) without a
//! `kubeconfig`, writes one from the pod's service account (the plugin runs on the host, where
//! there is no service account) and points the entry at it. The conflist and the kubeconfig
//! are readable by root only: they name credentials.
//!
//! The token written into the kubeconfig is the one the pod holds when the installer runs.
//! A projected service account token expires (an hour, or a year where the API server
//! extends tokens for older clients, its default) and kubelet replaces the pod's copy before
//! it does, so the installer has to run again: `cnikit-install --watch` does so periodically
//! (the DaemonSets' `cni-refresh` container), writing only what changed.
//!
//! The example binary `cnikit-install` runs [`install`]; see the README for its flags.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use cni_core::spec::ConfList;
use serde_json::Value;

use crate::plugin;

/// The mode of an installed plugin binary.
const BINARY_MODE: u32 = 0o755;
/// The mode of an installed conflist or kubeconfig: they may name credentials.
const SECRET_MODE: u32 = 0o600;
/// Temporary files start with this (and are swept when a run finds them left over).
const TEMP_PREFIX: &str = ".cnikit-install.";

/// What to install, and where.
#[derive(Debug, Clone)]
pub struct Install {
    /// The plugin binary to install.
    pub plugin: PathBuf,
    /// Its name in `bin_dir` (default `cnikit`, the `type` the conflist uses).
    pub plugin_name: String,
    /// The runtime's plugin directory, as this process sees it (`/host/opt/cni/bin` in an
    /// init container that mounts the host's `/opt/cni/bin` at `/host/opt/cni/bin`).
    pub bin_dir: PathBuf,
    /// The runtime's configuration directory, as this process sees it.
    pub conf_dir: PathBuf,
    /// The same directory as the host (and so the plugin) sees it: the path written into the
    /// conflist for the kubeconfig. Default: `conf_dir`.
    pub host_conf_dir: Option<PathBuf>,
    /// The configuration list template.
    pub template: PathBuf,
    /// The installed conflist's file name (runtimes use the first file in name order).
    pub file_name: String,
    /// This node's name (`nodeName` of the `cnikit` entry); `None` leaves the template's.
    pub node_name: Option<String>,
    /// The service account to write a kubeconfig from, when the IPAM store is `kubernetes`.
    pub service_account: Option<ServiceAccount>,
    /// Copy the files an etcd store names (`caFile`, `certFile`, `keyFile`, `passwordFile`)
    /// into `<conf_dir>/cnikit-etcd/` and point the conflist at the copies: in a pod they
    /// come from a mounted Secret, which the plugin, running on the host, cannot read.
    pub copy_etcd_credentials: bool,
}

/// A pod's service account credentials and the API server to reach with them.
#[derive(Debug, Clone)]
pub struct ServiceAccount {
    /// The directory holding `token` and `ca.crt`
    /// (`/var/run/secrets/kubernetes.io/serviceaccount` in a pod).
    pub dir: PathBuf,
    /// The API server's URL (`https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`).
    pub server: String,
}

/// What [`install`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The installed binary.
    pub binary: PathBuf,
    /// Whether the binary was written (false: it already had this content).
    pub binary_written: bool,
    /// The installed conflist.
    pub conflist: PathBuf,
    /// Whether the conflist was written.
    pub conflist_written: bool,
    /// The kubeconfig written for the plugin, if any.
    pub kubeconfig: Option<PathBuf>,
    /// The etcd credentials copied for the plugin.
    pub credentials: Vec<PathBuf>,
    /// Configuration files in `conf_dir` that sort before ours: a runtime that uses only the
    /// first file (kubelet's dockershim, containerd's CRI) will not use cnikit's.
    pub shadowed_by: Vec<PathBuf>,
    /// Every file this run wrote, in the order written (the others already had their
    /// content and mode, and were left alone).
    pub written: Vec<PathBuf>,
}

/// Why an installation failed. Nothing is left half-written when it does.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The template is not a usable configuration list.
    #[error("conflist template {path}: {reason}")]
    Template {
        /// The template.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The service account is incomplete.
    #[error("service account {dir}: {reason}")]
    ServiceAccount {
        /// Its directory.
        dir: PathBuf,
        /// What is missing.
        reason: String,
    },
}

/// The result of the installer's steps.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Installs the plugin binary and the node's conflist (and a kubeconfig when needed).
/// Everything is checked before anything is written.
pub fn install(spec: &Install) -> Result<Installed> {
    let plugin_bytes = fs::read(&spec.plugin).map_err(io(format!(
        "read the plugin binary {}",
        spec.plugin.display()
    )))?;
    let mut list = read_template(&spec.template)?;
    let extra = prepare(&mut list, spec)?;
    let conflist_bytes = to_json(&list);

    for dir in [&spec.bin_dir, &spec.conf_dir] {
        fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        sweep_temporaries(dir)?;
    }
    let binary = spec.bin_dir.join(&spec.plugin_name);
    let binary_written = write_atomic(&binary, &plugin_bytes, BINARY_MODE)?;
    let mut written = Vec::new();
    if binary_written {
        written.push(binary.clone());
    }
    if let Some((path, bytes)) = &extra.kubeconfig
        && write_atomic(path, bytes, SECRET_MODE)?
    {
        written.push(path.clone());
    }
    if !extra.credentials.is_empty() {
        let dir = spec.conf_dir.join(ETCD_DIR);
        fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(io(format!("chmod {}", dir.display())))?;
        sweep_temporaries(&dir)?;
    }
    for (path, bytes) in &extra.credentials {
        if write_atomic(path, bytes, SECRET_MODE)? {
            written.push(path.clone());
        }
    }
    // The conflist last: once it names the kubeconfig or the credentials, they are there.
    let conflist = spec.conf_dir.join(&spec.file_name);
    let conflist_written = write_atomic(&conflist, &conflist_bytes, SECRET_MODE)?;
    if conflist_written {
        written.push(conflist.clone());
    }
    let shadowed_by = shadowing(&spec.conf_dir, &spec.file_name)?;
    Ok(Installed {
        binary,
        binary_written,
        conflist,
        conflist_written,
        kubeconfig: extra.kubeconfig.map(|(path, _)| path),
        credentials: extra
            .credentials
            .into_iter()
            .map(|(path, _)| path)
            .collect(),
        shadowed_by,
        written,
    })
}

/// Reads and checks the template: JSON, a valid configuration list, one `cnikit` entry.
fn read_template(path: &Path) -> Result<Value> {
    let bad = |reason: String| Error::Template {
        path: path.to_owned(),
        reason,
    };
    let bytes = fs::read(path).map_err(io(format!("read {}", path.display())))?;
    let list = ConfList::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    list.validate().map_err(|e| bad(e.to_string()))?;
    let entries = list
        .plugins
        .iter()
        .filter(|p| p.plugin_type == plugin::TYPE)
        .count();
    if entries != 1 {
        return Err(bad(format!(
            "needs exactly one plugin of type {:?}, has {entries}",
            plugin::TYPE
        )));
    }
    // Decoding succeeded, so this is a JSON object with a `plugins` array.
    Ok(serde_json::from_slice(&bytes).expect("a decoded conflist is JSON"))
}

/// The files besides the binary and the conflist, each with its content.
#[derive(Default)]
struct Extra {
    kubeconfig: Option<(PathBuf, Vec<u8>)>,
    credentials: Vec<(PathBuf, Vec<u8>)>,
}

/// The etcd store's keys that name files.
const ETCD_FILE_KEYS: [&str; 4] = ["caFile", "certFile", "keyFile", "passwordFile"];
/// Where, in the configuration directory, the etcd credentials are copied.
const ETCD_DIR: &str = "cnikit-etcd";
/// The kubeconfig's name in the configuration directory.
const KUBECONFIG: &str = "cnikit-kubeconfig";

/// Sets the node name in the `cnikit` entry and points its store at the kubeconfig or the
/// credential copies to write; returns those files.
fn prepare(list: &mut Value, spec: &Install) -> Result<Extra> {
    let entry = list["plugins"]
        .as_array_mut()
        .and_then(|plugins| {
            plugins
                .iter_mut()
                .find(|p| p["type"].as_str() == Some(plugin::TYPE))
        })
        .expect("read_template found the entry");
    if let Some(node) = &spec.node_name {
        cni_core::registry::validate_node_name(node).map_err(|e| Error::Template {
            path: spec.template.clone(),
            reason: format!("node name: {e}"),
        })?;
        entry["nodeName"] = Value::String(node.clone());
    }
    let host_dir = spec.host_conf_dir.as_ref().unwrap_or(&spec.conf_dir);
    let mut extra = Extra::default();
    // Look before indexing mutably: `IndexMut` would insert the keys it does not find.
    let Some(store) = entry
        .pointer_mut("/ipam/store")
        .and_then(Value::as_object_mut)
    else {
        return Ok(extra);
    };
    match store.get("type").and_then(Value::as_str) {
        Some("kubernetes") if !store.contains_key("kubeconfig") => {
            // The plugin runs on the host, where in-cluster credentials do not exist: without
            // a kubeconfig every ADD would fail, so refuse to install such a list.
            let Some(account) = &spec.service_account else {
                return Err(Error::Template {
                    path: spec.template.clone(),
                    reason: "ipam.store is kubernetes without a kubeconfig, and there is no \
                             service account to write one from (run in a pod, or set \
                             ipam.store.kubeconfig)"
                        .into(),
                });
            };
            let bytes = kubeconfig(account)?;
            let on_host = host_dir.join(KUBECONFIG).display().to_string();
            store.insert("kubeconfig".into(), Value::String(on_host));
            extra.kubeconfig = Some((spec.conf_dir.join(KUBECONFIG), bytes));
        }
        Some("etcd") if spec.copy_etcd_credentials => {
            for key in ETCD_FILE_KEYS {
                let Some(source) = store.get(key).and_then(Value::as_str).map(PathBuf::from) else {
                    continue;
                };
                let bytes = fs::read(&source)
                    .map_err(io(format!("read ipam.store.{key} {}", source.display())))?;
                // Named by the key, so two keys naming files of one name cannot collide.
                let on_host = host_dir.join(ETCD_DIR).join(key).display().to_string();
                store.insert(key.into(), Value::String(on_host));
                extra
                    .credentials
                    .push((spec.conf_dir.join(ETCD_DIR).join(key), bytes));
            }
        }
        _ => {}
    }
    Ok(extra)
}

/// A kubeconfig for the plugin from the service account's token and CA.
fn kubeconfig(account: &ServiceAccount) -> Result<Vec<u8>> {
    let read = |name: &str| {
        fs::read_to_string(account.dir.join(name)).map_err(|e| Error::ServiceAccount {
            dir: account.dir.clone(),
            reason: format!("{name}: {e}"),
        })
    };
    let token = read("token")?;
    let ca = read("ca.crt")?;
    if token.trim().is_empty() {
        return Err(Error::ServiceAccount {
            dir: account.dir.clone(),
            reason: "token is empty".into(),
        });
    }
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "cluster", "cluster": {
            "server": account.server,
            "certificate-authority-data": base64::engine::general_purpose::STANDARD.encode(ca.as_bytes()),
        }}],
        "users": [{"name": "cnikit", "user": {"token": token.trim()}}],
        "contexts": [{"name": "cnikit", "context": {"cluster": "cluster", "user": "cnikit"}}],
        "current-context": "cnikit",
    });
    Ok(to_json(&config))
}

fn to_json(value: &Value) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(value).expect("a JSON value serializes");
    bytes.push(b'\n');
    bytes
}

/// Writes `bytes` to `path` through a synced temporary file and a rename, with `mode`.
/// Returns false, writing nothing, when the file already holds `bytes` with that mode.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<bool> {
    if let (Ok(old), Ok(meta)) = (fs::read(path), fs::metadata(path))
        && old == bytes
        && meta.permissions().mode() & 0o7777 == mode
    {
        return Ok(false);
    }
    let dir = path.parent().expect("installed files are in a directory");
    let name = path.file_name().expect("installed files have a name");
    let temp = dir.join(format!(
        "{TEMP_PREFIX}{}.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&temp)?;
        file.write_all(bytes)?;
        // The mode of `open` is masked by the umask; set it exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&temp);
        return Err(io(format!("write {}", temp.display()))(e));
    }
    if let Err(e) = fs::rename(&temp, path) {
        let _ = fs::remove_file(&temp);
        return Err(io(format!(
            "rename {} to {}",
            temp.display(),
            path.display()
        ))(e));
    }
    // The rename is durable once the directory is synced.
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(format!("sync {}", dir.display())))?;
    Ok(true)
}

/// Removes temporary files an interrupted earlier run left in `dir`.
fn sweep_temporaries(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(io(format!("list {}", dir.display())))? {
        let entry = entry.map_err(io(format!("list {}", dir.display())))?;
        if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            fs::remove_file(entry.path())
                .map_err(io(format!("remove {}", entry.path().display())))?;
        }
    }
    Ok(())
}

/// The configuration files of `dir` that a runtime would pick before `ours`: libcni loads
/// `*.conf`, `*.conflist` and `*.json` in name order.
fn shadowing(dir: &Path, ours: &str) -> Result<Vec<PathBuf>> {
    let mut before = Vec::new();
    for entry in fs::read_dir(dir).map_err(io(format!("list {}", dir.display())))? {
        let entry = entry.map_err(io(format!("list {}", dir.display())))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let config = [".conf", ".conflist", ".json"]
            .iter()
            .any(|ext| name.ends_with(ext));
        if config && name.as_str() < ours && !name.starts_with('.') {
            before.push(entry.path());
        }
    }
    before.sort();
    Ok(before)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn inode(path: &Path) -> u64 {
        fs::metadata(path).unwrap().ino()
    }

    #[test]
    fn a_file_is_replaced_by_a_rename_and_left_alone_when_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("10-net.conflist");
        assert!(write_atomic(&path, b"one", SECRET_MODE).unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"one");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
            SECRET_MODE
        );
        let first = inode(&path);

        // Same content, same mode: nothing is written.
        assert!(!write_atomic(&path, b"one", SECRET_MODE).unwrap());
        assert_eq!(inode(&path), first);

        // New content: a new file renamed over the old one (a reader holding the old one
        // open keeps reading it whole).
        let mut old = fs::File::open(&path).unwrap();
        assert!(write_atomic(&path, b"two", SECRET_MODE).unwrap());
        assert_ne!(inode(&path), first);
        let mut held = String::new();
        std::io::Read::read_to_string(&mut old, &mut held).unwrap();
        assert_eq!(held, "one");

        // Only the mode differs: written again, with the mode.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(write_atomic(&path, b"two", SECRET_MODE).unwrap());
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
            SECRET_MODE
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["10-net.conflist"], "no temporary file is left");
    }

    #[test]
    fn leftover_temporaries_are_swept_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        for name in [".cnikit-install.cnikit.17", "cnikit", ".other"] {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        sweep_temporaries(dir.path()).unwrap();
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [".other", "cnikit"]);
    }

    #[test]
    fn configuration_files_that_sort_first_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "00-loopback.conf",
            "05-other.json",
            "07-notes.txt",
            ".01-hidden.conflist",
            "10-cnikit.conflist",
            "99-late.conflist",
        ] {
            fs::write(dir.path().join(name), b"{}").unwrap();
        }
        let found = shadowing(dir.path(), "10-cnikit.conflist").unwrap();
        assert_eq!(
            found,
            [
                dir.path().join("00-loopback.conf"),
                dir.path().join("05-other.json")
            ]
        );
        assert!(
            shadowing(dir.path(), "00-cnikit.conflist")
                .unwrap()
                .is_empty()
        );
    }

    fn spec(dir: &Path) -> Install {
        Install {
            plugin: dir.join("plugin"),
            plugin_name: "cnikit".into(),
            bin_dir: dir.join("bin"),
            conf_dir: dir.join("conf"),
            host_conf_dir: Some("/etc/cni/net.d".into()),
            template: dir.join("template"),
            file_name: "10-cnikit.conflist".into(),
            node_name: Some("node-1".into()),
            service_account: None,
            copy_etcd_credentials: false,
        }
    }

    fn list(store: Value) -> Value {
        serde_json::json!({
            "cniVersion": "1.0.0", "name": "n",
            "plugins": [
                {"type": "cnikit", "ipam": {"type": "cnikit-ipam", "pool": "10.1.0.0/16",
                                            "store": store}},
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        })
    }

    #[test]
    fn the_node_name_goes_into_the_cnikit_entry_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut value = list(serde_json::json!({"type": "file"}));
        let extra = prepare(&mut value, &spec(dir.path())).unwrap();
        assert!(extra.kubeconfig.is_none() && extra.credentials.is_empty());
        assert_eq!(value["plugins"][0]["nodeName"], "node-1");
        assert!(value["plugins"][1].get("nodeName").is_none());
        assert_eq!(
            value["plugins"][0]["ipam"]["store"],
            serde_json::json!({"type": "file"})
        );
    }

    #[test]
    fn a_kubernetes_store_needs_a_kubeconfig_or_a_service_account() {
        let dir = tempfile::tempdir().unwrap();
        let mut value = list(serde_json::json!({"type": "kubernetes"}));
        let err = prepare(&mut value, &spec(dir.path())).err().unwrap();
        assert!(err.to_string().contains("no service account"), "{err}");
        // One the list names is kept, and nothing is written for it.
        let store = serde_json::json!({"type": "kubernetes", "kubeconfig": "/etc/kube.conf"});
        let mut value = list(store.clone());
        let extra = prepare(&mut value, &spec(dir.path())).unwrap();
        assert!(extra.kubeconfig.is_none());
        assert_eq!(value["plugins"][0]["ipam"]["store"], store);
    }

    #[test]
    fn etcd_credentials_stay_where_they_are_unless_copied() {
        let dir = tempfile::tempdir().unwrap();
        let store = serde_json::json!({"type": "etcd", "endpoints": ["https://e:2379"],
                                       "keyFile": "/secret/tls.key"});
        let mut value = list(store.clone());
        let extra = prepare(&mut value, &spec(dir.path())).unwrap();
        assert!(extra.credentials.is_empty());
        assert_eq!(value["plugins"][0]["ipam"]["store"], store);
    }

    #[test]
    fn a_kubeconfig_carries_the_token_and_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("token"), "abc.def\n").unwrap();
        fs::write(dir.path().join("ca.crt"), "CA").unwrap();
        let account = ServiceAccount {
            dir: dir.path().to_owned(),
            server: "https://10.96.0.1:443".into(),
        };
        let config: Value = serde_json::from_slice(&kubeconfig(&account).unwrap()).unwrap();
        assert_eq!(config["users"][0]["user"]["token"], "abc.def");
        assert_eq!(
            config["clusters"][0]["cluster"]["certificate-authority-data"],
            "Q0E="
        );
        assert_eq!(
            config["clusters"][0]["cluster"]["server"],
            "https://10.96.0.1:443"
        );
        assert_eq!(config["current-context"], "cnikit");

        fs::remove_file(dir.path().join("ca.crt")).unwrap();
        let err = kubeconfig(&account).unwrap_err().to_string();
        assert!(err.contains("ca.crt"), "{err}");
    }
}
