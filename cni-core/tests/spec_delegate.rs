//! IPAM delegation against the real reference `host-local` (/usr/lib/cni/host-local).
//!
//! host-local only touches its `dataDir`, pointed at a temporary directory here, so no
//! namespace or root is needed. Skips loudly when the binary is missing.

use std::path::Path;

use cni_core::ErrorCode;
use cni_core::ipam::{Attachment, DelegatedIpam, Ipam};
use cni_core::runner::Request;
use cni_core::spec::CniResult;
use cni_core::{Error, Result};
use serde_json::{Value, json};

const HOST_LOCAL_DIR: &str = "/usr/lib/cni";

fn host_local() -> bool {
    testkit::files(
        "delegation tests",
        &[&Path::new(HOST_LOCAL_DIR).join("host-local")],
        "containernetworking-plugins",
    )
}

/// A network whose addresses live in a fresh temporary `dataDir`.
struct Net {
    data: tempfile::TempDir,
    name: String,
    version: &'static str,
}

impl Net {
    fn new(tag: &str, version: &'static str) -> Self {
        Net {
            data: tempfile::tempdir().unwrap(),
            name: format!("cnkt-{tag}-{}", std::process::id()),
            version,
        }
    }

    fn config(&self, prev: Option<&CniResult>) -> Value {
        let mut conf = json!({
            "cniVersion": self.version,
            "name": self.name,
            "type": "cnikit",
            "mtu": 1450,
            "ipam": {
                "type": "host-local",
                "dataDir": self.data.path(),
                // .1 is the gateway: .2 … .6 are free.
                "ranges": [[{"subnet": "10.77.0.0/29", "gateway": "10.77.0.1"}]],
                "routes": [{"dst": "0.0.0.0/0"}]
            }
        });
        if let Some(prev) = prev {
            conf["prevResult"] = prev.to_json(self.version.parse().unwrap());
        }
        conf
    }

    fn request(&self, command: &str, container: &str, conf: &Value) -> Result<Request> {
        let env = [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", container),
            ("CNI_NETNS", "/var/run/netns/cnkt-unused"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=default"),
            ("CNI_PATH", HOST_LOCAL_DIR),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        Request::from_env(env, conf.to_string().as_bytes(), &[])
    }

    fn ipam(&self, command: &str, container: &str) -> DelegatedIpam {
        let req = self
            .request(command, container, &self.config(None))
            .unwrap();
        DelegatedIpam::new(&req).unwrap()
    }

    fn attachment(&self, container: &str) -> Attachment {
        Attachment::new(&self.name, container, "eth0")
    }

    /// Addresses host-local holds, with the container each belongs to.
    fn held(&self) -> Vec<(String, String)> {
        let dir = self.data.path().join(&self.name);
        let mut held: Vec<(String, String)> = std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().into_string().unwrap())
                    .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                    .map(|n| {
                        let owner = std::fs::read_to_string(dir.join(&n)).unwrap();
                        (n, owner.lines().next().unwrap_or("").to_owned())
                    })
                    .collect()
            })
            .unwrap_or_default();
        held.sort();
        held
    }
}

#[tokio::test]
async fn allocate_and_release_through_host_local() {
    if !host_local() {
        return;
    }
    for version in ["0.3.1", "0.4.0", "1.0.0"] {
        let net = Net::new("hl-alloc", version);
        let ipam = net.ipam("ADD", "ctr-a");
        assert_eq!(ipam.plugin(), "host-local");

        let a = ipam.allocate(&net.attachment("ctr-a")).await.unwrap();
        assert_eq!(a.ips.len(), 1, "{version}");
        assert_eq!(a.ips[0].address.to_string(), "10.77.0.2/29", "{version}");
        assert_eq!(a.ips[0].gateway, Some("10.77.0.1".parse().unwrap()));
        assert_eq!(a.routes[0].dst.to_string(), "0.0.0.0/0");
        assert_eq!(net.held(), [("10.77.0.2".into(), "ctr-a".into())]);

        // Another container gets another address.
        let b = ipam.allocate(&net.attachment("ctr-b")).await.unwrap();
        assert_eq!(b.ips[0].address.to_string(), "10.77.0.3/29");

        // host-local's idempotency: a second ADD of the same attachment is refused, and
        // the code it chose is passed on.
        match ipam.allocate(&net.attachment("ctr-a")).await.unwrap_err() {
            Error::Delegate {
                plugin, code, msg, ..
            } => {
                assert_eq!(plugin, "host-local");
                assert_ne!(code, ErrorCode::DELEGATE.0, "host-local's own code");
                assert!(msg.contains("duplicate allocation"), "{msg}");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(net.held().len(), 2);

        // Release (DEL) frees exactly that attachment, and again is fine.
        ipam.release(&net.attachment("ctr-a")).await.unwrap();
        assert_eq!(net.held(), [("10.77.0.3".into(), "ctr-b".into())]);
        ipam.release(&net.attachment("ctr-a")).await.unwrap();
        ipam.release(&net.attachment("never-added")).await.unwrap();

        // After release the attachment can allocate again.
        let again = ipam.allocate(&net.attachment("ctr-a")).await.unwrap();
        assert_eq!(again.ips.len(), 1);
        assert_eq!(net.held().len(), 2);
    }
}

#[tokio::test]
async fn a_failed_add_is_rolled_back_by_releasing_the_delegate() {
    if !host_local() {
        return;
    }
    let net = Net::new("hl-rollback", "1.0.0");
    // The composed plugin's ADD: allocate, then a later step (the pod network) fails, so it
    // releases with the same delegate, built from the ADD request.
    let ipam = net.ipam("ADD", "ctr-rb");
    let attachment = net.attachment("ctr-rb");
    let allocation = ipam.allocate(&attachment).await.unwrap();
    assert_eq!(net.held().len(), 1);
    // ... the pod network fails here; the caller releases with the same delegate.
    ipam.release(&attachment).await.unwrap();
    assert!(
        net.held().is_empty(),
        "the address leaked: {:?}",
        net.held()
    );

    // The next pod allocates normally, and the rolled-back attachment holds nothing.
    let next = net.ipam("ADD", "ctr-next");
    let got = next.allocate(&net.attachment("ctr-next")).await.unwrap();
    assert_ne!(
        got.ips, allocation.ips,
        "host-local moves on to the next address"
    );
    assert_eq!(
        net.held(),
        [(got.ips[0].address.addr().to_string(), "ctr-next".into())]
    );
}

#[tokio::test]
async fn check_uses_the_previous_result() {
    if !host_local() {
        return;
    }
    let net = Net::new("hl-check", "1.0.0");
    let added = net
        .ipam("ADD", "ctr-c")
        .allocate(&net.attachment("ctr-c"))
        .await
        .unwrap();
    let prev = CniResult {
        ips: added.ips.clone(),
        routes: added.routes.clone(),
        ..CniResult::default()
    };
    let check_req = net
        .request("CHECK", "ctr-c", &net.config(Some(&prev)))
        .unwrap();
    let ipam = DelegatedIpam::new(&check_req).unwrap();
    let checked = ipam.check(&net.attachment("ctr-c")).await.unwrap();
    assert_eq!(checked.ips, added.ips);

    // Once released, host-local's CHECK fails and its error is passed on.
    ipam.release(&net.attachment("ctr-c")).await.unwrap();
    let e = ipam.check(&net.attachment("ctr-c")).await.unwrap_err();
    assert!(matches!(e, Error::Delegate { .. }), "{e:?}");

    // CHECK does not exist before 0.4.0.
    let old = Net::new("hl-check-old", "0.3.1");
    let e = old
        .ipam("ADD", "ctr-c")
        .check(&old.attachment("ctr-c"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::INCOMPATIBLE_VERSION);
}

#[tokio::test]
async fn exhaustion_is_the_delegates_error() {
    if !host_local() {
        return;
    }
    let net = Net::new("hl-full", "1.0.0");
    let ipam = net.ipam("ADD", "ctr-0");
    for i in 0..5 {
        ipam.allocate(&net.attachment(&format!("ctr-{i}")))
            .await
            .unwrap();
    }
    match ipam.allocate(&net.attachment("ctr-5")).await.unwrap_err() {
        Error::Delegate { msg, .. } => assert!(msg.contains("no IP addresses available"), "{msg}"),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(net.held().len(), 5);
}

#[tokio::test]
async fn gc_is_skipped_when_the_delegate_does_not_speak_the_version() {
    if !host_local() {
        return;
    }
    // host-local 1.1.x speaks up to 1.0.0: a 1.1.0 GC is not sent to it.
    let net = Net::new("hl-gc", "1.0.0");
    net.ipam("ADD", "ctr-g")
        .allocate(&net.attachment("ctr-g"))
        .await
        .unwrap();
    assert_eq!(net.held().len(), 1);

    let mut gc = net.config(None);
    gc["cniVersion"] = json!("1.1.0");
    gc["cni.dev/valid-attachments"] = json!([]);
    let req = net.request("GC", "", &gc).unwrap();
    let report = DelegatedIpam::new(&req).unwrap().gc(&[]).await.unwrap();
    assert!(report.released.is_empty());
    assert_eq!(net.held().len(), 1, "nothing may be released");

    // Before 1.1.0 there is no GC at all.
    let report = net.ipam("ADD", "x").gc(&[]).await.unwrap();
    assert!(report.released.is_empty());
}

#[tokio::test]
async fn delegation_errors() {
    // No ipam section, or no plugin name: 7 before anything runs.
    let net = Net::new("hl-err", "1.0.0");
    let mut conf = net.config(None);
    conf.as_object_mut().unwrap().remove("ipam");
    let req = net.request("ADD", "ctr-e", &conf).unwrap();
    assert_eq!(
        DelegatedIpam::new(&req).unwrap_err().code(),
        ErrorCode::INVALID_CONFIG
    );

    // An attachment of another network: 7.
    let ipam = net.ipam("ADD", "ctr-e");
    let other = Attachment::new("other-net", "ctr-e", "eth0");
    assert_eq!(
        ipam.allocate(&other).await.unwrap_err().code(),
        ErrorCode::INVALID_CONFIG
    );

    // A delegate that is not in CNI_PATH: 102.
    let mut conf = net.config(None);
    conf["ipam"]["type"] = json!("cnikit-no-such-ipam");
    let req = net.request("ADD", "ctr-e", &conf).unwrap();
    let e = DelegatedIpam::new(&req)
        .unwrap()
        .allocate(&net.attachment("ctr-e"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::DELEGATE);
    assert!(e.to_string().contains(HOST_LOCAL_DIR), "{e}");

    if !host_local() {
        return;
    }
    // host-local refusing its configuration: its error, not ours.
    let mut conf = net.config(None);
    conf["ipam"]["ranges"] = json!([[{"subnet": "not-a-subnet"}]]);
    let req = net.request("ADD", "ctr-e", &conf).unwrap();
    let e = DelegatedIpam::new(&req)
        .unwrap()
        .allocate(&net.attachment("ctr-e"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Delegate { .. }), "{e:?}");
    assert!(net.held().is_empty());
}

#[tokio::test]
async fn gc_is_delegated_with_this_networks_valid_attachments() {
    if !testkit::files(
        "gc_is_delegated_with_this_networks_valid_attachments",
        &[Path::new("/bin/sh")],
        "dash",
    ) {
        return;
    }
    // An IPAM that speaks 1.1.0 and records its GC input.
    let bin = tempfile::tempdir().unwrap();
    let record = bin.path().join("gc-input");
    let script = format!(
        "#!/bin/sh\ncase \"$CNI_COMMAND\" in\n\
         VERSION) echo '{{\"cniVersion\":\"1.1.0\",\"supportedVersions\":[\"1.0.0\",\"1.1.0\"]}}' ;;\n\
         GC) cat > '{}'; echo \"$CNI_CONTAINERID|$CNI_IFNAME\" > '{}.env' ;;\n\
         *) exit 1 ;;\nesac\n",
        record.display(),
        record.display()
    );
    let plugin = bin.path().join("gc-ipam");
    std::fs::write(&plugin, script).unwrap();
    std::fs::set_permissions(&plugin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let name = format!("cnkt-gcd-{}", std::process::id());
    let conf = json!({
        "cniVersion": "1.1.0", "name": name, "type": "cnikit",
        "ipam": {"type": "gc-ipam"},
        "cni.dev/attachments": [{"containerID": "stale", "ifname": "eth0"}]
    });
    let env = [
        ("CNI_COMMAND", "GC"),
        ("CNI_PATH", bin.path().to_str().unwrap()),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    let req = Request::from_env(env, conf.to_string().as_bytes(), &[]).unwrap();
    let valid = [
        Attachment::new(&name, "ctr-1", "eth0"),
        Attachment::new("another-network", "ctr-2", "eth0"),
    ];
    DelegatedIpam::new(&req).unwrap().gc(&valid).await.unwrap();

    let sent: Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    let env_line = std::fs::read_to_string(record.with_extension("env")).unwrap();
    assert_eq!(
        sent["cni.dev/valid-attachments"],
        json!([{"containerID": "ctr-1", "ifname": "eth0"}]),
        "only this network's attachments, under the current key"
    );
    assert!(sent.get("cni.dev/attachments").is_none());
    assert_eq!(sent["ipam"]["type"], "gc-ipam");
    assert_eq!(env_line.trim(), "|", "GC carries no container or interface");
}

/// An `ipam.type` that names the plugin itself, by its `type` or by an executable in
/// `CNI_PATH` that is this very process, is refused at once (code 7): the delegate would get
/// the same configuration and delegate to itself again, without end. Every exec of the
/// `exec` module refuses this process's own executable too.
#[tokio::test]
async fn an_ipam_type_that_is_the_plugin_itself_is_code_7() {
    let bin = tempfile::tempdir().unwrap();
    let own = std::env::current_exe().unwrap();
    std::os::unix::fs::symlink(&own, bin.path().join("self-ipam")).unwrap();
    let request = |plugin_type: &str, ipam_type: &str| {
        let conf = json!({
            "cniVersion": "1.0.0", "name": "cnkt-self", "type": plugin_type,
            "ipam": {"type": ipam_type}
        });
        let env = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "ctr-self"),
            ("CNI_NETNS", "/var/run/netns/cnkt-unused"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", bin.path().to_str().unwrap()),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        Request::from_env(env, conf.to_string().as_bytes(), &[]).unwrap()
    };

    // By name: the configuration's own type.
    let e = DelegatedIpam::new(&request("cnikit", "cnikit")).unwrap_err();
    assert_eq!(e.code(), ErrorCode::INVALID_CONFIG, "{e}");
    assert!(
        e.to_string().contains("ipam.type") && e.to_string().contains("itself"),
        "{e}"
    );
    // By path: another name whose executable is this process's (a symlink here).
    let e = DelegatedIpam::new(&request("bridge", "self-ipam")).unwrap_err();
    assert_eq!(e.code(), ErrorCode::INVALID_CONFIG, "{e}");
    assert!(e.to_string().contains("own executable"), "{e}");
    // Any other exec of this process's executable, whatever the path leading to it.
    for path in [own.clone(), bin.path().join("self-ipam")] {
        let e = cni_core::exec::exec_plugin(&path, &[], b"{}")
            .await
            .unwrap_err();
        assert!(matches!(e, Error::ExecSelf { .. }), "{path:?}: {e:?}");
        assert_eq!(e.code(), ErrorCode::INVALID_CONFIG);
    }
    // Another executable is still a delegate.
    std::os::unix::fs::symlink("/bin/true", bin.path().join("other-ipam")).unwrap();
    let other = DelegatedIpam::new(&request("bridge", "other-ipam")).unwrap();
    assert_eq!(other.plugin(), "other-ipam");
}
