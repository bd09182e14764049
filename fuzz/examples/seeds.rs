//! Writes the seed corpora of the fuzz targets into `fuzz/corpus/TARGET/`: the repository's
//! CNI fixtures and sample configuration lists, and datastores, node records and BGP
//! messages made by cnikit's own code. No root needed; the output is committed.
//!
//! ```sh
//! cargo run -p cnikit-fuzz --example seeds
//! ```

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use cni_core::ipam::{Attachment, BlockIpam, BlockIpamConfig, Ipam};
use cni_core::registry::{NodeRecord, NodeRegistry, StoreRegistry};
use cni_core::state::NodeState;
use cni_core::store::{FileStore, MemoryStore, Store};
use rustbgpd_wire::{
    Afi, AsPath, AsPathSegment, Capability, Ipv4NlriEntry, Ipv4Prefix, Ipv4UnicastMode, Message,
    NotificationMessage, OpenMessage, Origin, PathAttribute, Safi, UpdateMessage, encode_message,
    notification::NotificationCode,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn write(target: &str, name: &str, bytes: &[u8]) -> Result<()> {
    let dir = root().join("corpus").join(target);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(name), bytes).with_context(|| format!("{target}/{name}"))
}

/// Copies every file of `dir` (relative to the repository) into the corpus of `target`.
fn copy_dir(target: &str, dir: &str, prefix: &str) -> Result<()> {
    let dir = root().join("..").join(dir);
    for entry in std::fs::read_dir(&dir).with_context(|| dir.display().to_string())? {
        let path = entry?.path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        write(target, &format!("{prefix}{name}"), &std::fs::read(&path)?)?;
    }
    Ok(())
}

fn netconfs() -> Result<()> {
    copy_dir("netconf", "cni-core/tests/fixtures/configs", "")?;
    let samples = [
        (
            "cnikit-bridge.json",
            serde_json::json!({"cniVersion":"1.1.0","name":"net","type":"cnikit",
                "podNetwork":"bridge","bridge":"cnikit0","isGateway":true,"mtu":1450,
                "dataDir":"/var/lib/cni/cnikit/net","nodeName":"node-1","routing":"vxlan",
                "vxlan":{"vni":7,"port":4789,"directRouting":true},
                "agent":{"ttlSeconds":20,"resyncSeconds":10,"metricsAddress":"127.0.0.1:9153"},
                "ipam":{"type":"cnikit-ipam","pool":"10.244.0.0/16","blockSize":26,
                    "maxBlocksPerNode":4}}),
        ),
        (
            "cnikit-etcd.json",
            serde_json::json!({"cniVersion":"1.0.0","name":"net","type":"cnikit",
                "podNetwork":"routed","routing":"bgp","nodeName":"node-2",
                "bgp":{"asNumber":64512,"gracefulRestart":true},
                "ipam":{"type":"cnikit-ipam","pool":"fd00:10::/64","blockSize":122,
                    "store":{"type":"etcd","endpoints":["https://127.0.0.1:2379"],
                        "timeoutMs":5000,"dialTimeoutMs":2000,"username":"u",
                        "passwordFile":"/etc/cnikit/etcd-password","prefix":"/cnikit"}}}),
        ),
        (
            "cnikit-ipip-del.json",
            serde_json::json!({"cniVersion":"0.4.0","name":"net","type":"cnikit",
                "podNetwork":"ebpf","routing":"ipip","ipip":{"mode":"crossSubnet"},
                "ipam":{"type":"cnikit-ipam","pool":"10.245.0.0/16",
                    "store":{"type":"file","path":"/var/lib/cni/cnikit/store"}},
                "prevResult":{"cniVersion":"0.4.0","interfaces":[{"name":"eth0",
                    "mac":"0a:58:0a:f4:00:02","sandbox":"/var/run/netns/x"}],
                    "ips":[{"version":"4","address":"10.245.0.2/32","gateway":"169.254.1.1",
                        "interface":0}],"routes":[{"dst":"0.0.0.0/0"}],"dns":{}}}),
        ),
        (
            "host-local-delegate.json",
            serde_json::json!({"cniVersion":"1.1.0","name":"net","type":"cnikit",
                "ipam":{"type":"host-local","ranges":[[{"subnet":"10.1.0.0/24"}]]},
                "runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":8080,
                    "protocol":"tcp"}]},
                "cni.dev/valid-attachments":[{"containerID":"c","ifname":"eth0"}]}),
        ),
    ];
    for (name, value) in samples {
        write("netconf", name, &serde_json::to_vec_pretty(&value)?)?;
    }
    Ok(())
}

fn conflists() -> Result<()> {
    copy_dir("conflist", "cni-core/tests/fixtures/conflists", "")?;
    copy_dir("conflist", "examples/conf", "")
}

fn envs() -> Result<()> {
    let samples: [(&str, &str); 4] = [
        (
            "add",
            "CNI_COMMAND=ADD\nCNI_CONTAINERID=abc123\nCNI_NETNS=/var/run/netns/p\n\
             CNI_IFNAME=eth0\nCNI_PATH=/opt/cni/bin:/usr/lib/cni\n\
             CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;\
             K8S_POD_INFRA_CONTAINER_ID=abc123\n",
        ),
        (
            "del-no-netns",
            "CNI_COMMAND=DEL\nCNI_CONTAINERID=a.b_c-d\nCNI_IFNAME=net1\nCNI_PATH=/opt/cni/bin\n",
        ),
        ("gc", "CNI_COMMAND=GC\nCNI_PATH=/opt/cni/bin\n"),
        ("version", "CNI_COMMAND=VERSION\n"),
    ];
    for (name, text) in samples {
        write("env", name, text.as_bytes())?;
    }
    Ok(())
}

fn results() -> Result<()> {
    copy_dir("result", "cni-core/tests/fixtures/results", "")?;
    copy_dir("result", "cni-core/tests/fixtures/conversions", "")?;
    copy_dir("result", "cni-core/tests/fixtures/errors", "error-")?;
    write(
        "result",
        "version-answer.json",
        br#"{"cniVersion":"1.1.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]}"#,
    )
}

/// A datastore two nodes used: blocks claimed, addresses allocated and released, node
/// records registered.
async fn populate<S: Store + 'static>(store: std::sync::Arc<S>) -> Result<()> {
    for (node, ip) in [("node-1", "172.30.1.11"), ("node-2", "172.30.1.12")] {
        let mut config = BlockIpamConfig::new("10.244.0.0/24".parse()?, node, "fuzz");
        config.block_prefix = 28;
        let ipam = BlockIpam::new(store.clone(), config)?;
        for i in 0..3 {
            ipam.allocate(&Attachment::new("fuzz", format!("{node}-c{i}"), "eth0"))
                .await?;
        }
        ipam.release(&Attachment::new("fuzz", format!("{node}-c0"), "eth0"))
            .await?;
        let registry =
            StoreRegistry::with_prefix(store.clone(), cni_core::ipam::block::DEFAULT_KEY_PREFIX);
        let record = NodeRecord {
            name: node.into(),
            address: ip.parse()?,
            prefix_len: 24,
            blocks: ipam.node_blocks().await?,
            backend: [("vtepMac".to_owned(), "0a:58:ac:1e:01:0b".to_owned())].into(),
        };
        registry.register(&record, Duration::from_secs(60)).await?;
    }
    Ok(())
}

async fn stores() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = std::sync::Arc::new(FileStore::new(dir.path()));
    populate(file.clone()).await?;
    write(
        "store_file",
        "two-nodes.json",
        &std::fs::read(dir.path().join(cni_core::store::file::DATA_FILE))?,
    )?;
    write("store_file", "empty.json", br#"{"revision":0,"keys":{}}"#)?;

    let memory = std::sync::Arc::new(MemoryStore::new());
    populate(memory.clone()).await?;
    let mut pairs = Vec::new();
    for kv in memory.dump() {
        let key = kv
            .key
            .strip_prefix(&format!("{}/", cni_core::ipam::block::DEFAULT_KEY_PREFIX))
            .unwrap_or(&kv.key);
        pairs.extend_from_slice(key.as_bytes());
        pairs.push(0);
        pairs.extend_from_slice(&kv.value);
        pairs.push(0);
    }
    write("store_records", "two-nodes", &pairs)?;
    Ok(())
}

fn node_records() -> Result<()> {
    let record = NodeRecord {
        name: "node-1".into(),
        address: "172.30.1.11".parse()?,
        prefix_len: 24,
        blocks: vec!["10.244.0.0/26".parse()?, "fd00:10::/122".parse()?],
        backend: [("bgpAs".to_owned(), "64512".to_owned())].into(),
    };
    write("node_records", "record.json", &serde_json::to_vec(&record)?)?;
    let mut state = NodeState::new("node-1", "bgp", 1480, vec!["10.244.0.0/26".parse()?]);
    state.peers = vec!["node-2".into()];
    state
        .unroutable
        .insert("node-3".into(), "not on-link".into());
    state.routing = Some(serde_json::json!({"sessions":[{"peer":"172.30.1.12",
        "state":"Established"}]}));
    write(
        "node_records",
        "state.json",
        &serde_json::to_vec_pretty(&state)?,
    )?;
    Ok(())
}

fn bgp() -> Result<()> {
    let us = Ipv4Addr::new(172, 30, 1, 11);
    let open = Message::Open(OpenMessage {
        version: 4,
        my_as: 64512,
        hold_time: 90,
        bgp_identifier: us,
        capabilities: vec![
            Capability::MultiProtocol {
                afi: Afi::Ipv4,
                safi: Safi::Unicast,
            },
            Capability::FourOctetAs { asn: 64512 },
        ],
    });
    let entry = |s: &str| -> Result<Ipv4NlriEntry> {
        let net: ipnet_like::Net = s.parse()?;
        Ok(Ipv4NlriEntry {
            path_id: 0,
            prefix: Ipv4Prefix::new(net.0, net.1),
        })
    };
    let attributes = vec![
        PathAttribute::Origin(Origin::Igp),
        PathAttribute::AsPath(AsPath {
            segments: vec![AsPathSegment::AsSequence(vec![64513])],
        }),
        PathAttribute::NextHop(us),
        PathAttribute::LocalPref(100),
    ];
    let update = UpdateMessage::try_build(
        &[entry("10.244.1.0/26")?, entry("10.244.2.0/26")?],
        &[entry("10.244.3.0/26")?],
        &attributes,
        true,
        false,
        Ipv4UnicastMode::Body,
    )?;
    let eor = UpdateMessage::try_build(&[], &[], &[], true, false, Ipv4UnicastMode::Body)?;
    let notification = Message::Notification(NotificationMessage::new(
        NotificationCode::Cease,
        2,
        bytes::Bytes::new(),
    ));
    let mut session = Vec::new();
    for (name, message) in [
        ("open", open),
        ("keepalive", Message::Keepalive),
        ("update", Message::Update(update)),
        ("end-of-rib", Message::Update(eor)),
        ("notification", notification),
    ] {
        let bytes = encode_message(&message)?;
        write("bgp", name, &bytes)?;
        session.extend_from_slice(&bytes);
    }
    write("bgp", "session", &session)
}

/// `a.b.c.d/len` without another dependency.
mod ipnet_like {
    pub struct Net(pub std::net::Ipv4Addr, pub u8);
    impl std::str::FromStr for Net {
        type Err = anyhow::Error;
        fn from_str(s: &str) -> anyhow::Result<Net> {
            let (a, l) = s.split_once('/').ok_or_else(|| anyhow::anyhow!("no /"))?;
            Ok(Net(a.parse()?, l.parse()?))
        }
    }
}

fn main() -> Result<()> {
    netconfs()?;
    conflists()?;
    envs()?;
    results()?;
    node_records()?;
    bgp()?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(stores())?;
    println!(
        "seed corpora written to {}",
        root().join("corpus").display()
    );
    Ok(())
}
