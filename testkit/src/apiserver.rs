//! The files and the command line of a private kube-apiserver (feature `apiserver`): a
//! self-signed CA and serving certificate (made with `rcgen`), the service-account key pair,
//! a static token file and kubeconfigs. [`kube::KubeApi`](crate::kube::KubeApi) runs the
//! tests' server with them; the lab's `--store kubernetes` runs its own.
//!
//! Layout of the directory [`write_files`] fills and [`args`] points at:
//!
//! | file | what |
//! |---|---|
//! | `ca.crt` | the CA that signed the serving certificate (clients trust it) |
//! | `server.crt`, `server.key` | the serving certificate: `127.0.0.1`, `localhost`, `kubernetes.default.svc` and the given addresses |
//! | `sa.key`, `sa.pub` | the service-account token signer |
//! | `tokens.csv` | the static bearer tokens |
//! | `certs/` | the server's own generated files |
//!
//! The directory is made `0700` and the private keys and the token file `0600`: the token
//! file holds an administrator's token.

use std::error::Error;
use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The environment variable naming a kube-apiserver binary to use instead of the cached one.
pub const KUBE_APISERVER_ENV: &str = "CNIKIT_KUBE_APISERVER";

/// Where `scripts/kube-apiserver.sh` caches the binary it builds.
pub const KUBE_APISERVER_CACHED: &str = "/var/cache/cnikit/kube-apiserver-1.20.2/kube-apiserver";

/// The kube-apiserver binary: [`KUBE_APISERVER_ENV`] or the cached build.
pub fn kube_apiserver_binary() -> PathBuf {
    std::env::var_os(KUBE_APISERVER_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(KUBE_APISERVER_CACHED))
}

/// One line of the static token file: a bearer token and who it authenticates.
#[derive(Debug, Clone, Copy)]
pub struct Token<'a> {
    /// The bearer token.
    pub token: &'a str,
    /// The user name (`system:serviceaccount:<ns>:<name>` is that service account to RBAC).
    pub user: &'a str,
    /// The user's groups.
    pub groups: &'a [&'a str],
}

/// Writes the CA, the serving certificate (for loopback, `kubernetes.default.svc` and
/// `addresses`), the service-account key pair and the token file into `dir`.
pub fn write_files(dir: &Path, addresses: &[&str], tokens: &[Token]) -> Result<(), Box<dyn Error>> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "cnikit private kube CA");
    ca.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let mut names = vec![
        "127.0.0.1".to_owned(),
        "localhost".to_owned(),
        "kubernetes.default.svc".to_owned(),
    ];
    names.extend(addresses.iter().map(|a| (*a).to_owned()));
    let mut server = CertificateParams::new(names)?;
    server
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server.signed_by(&key, &issuer)?;
    fs::write(dir.join("ca.crt"), ca_cert.pem())?;
    fs::write(dir.join("server.crt"), server_cert.pem())?;
    write_private(&dir.join("server.key"), &key.serialize_pem())?;
    // The service-account token signer: its own key.
    let sa = KeyPair::generate()?;
    write_private(&dir.join("sa.key"), &sa.serialize_pem())?;
    fs::write(dir.join("sa.pub"), sa.public_key_pem())?;
    let mut csv = String::new();
    for t in tokens {
        // token,user,uid,"group1,group2"
        writeln!(
            csv,
            "{},{},{},\"{}\"",
            t.token,
            t.user,
            t.user,
            t.groups.join(",")
        )?;
    }
    write_private(&dir.join("tokens.csv"), &csv)?;
    Ok(())
}

/// Writes `text` to `path`, readable and writable by its owner only (also when the file
/// was there before).
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(fs::Permissions::from_mode(0o600))?;
    file.write_all(text.as_bytes())
}

/// A kubeconfig for `server` with CA file `ca` and a bearer token.
pub fn kubeconfig(server: &str, ca: &Path, token: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: cnikit
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: cnikit
  user:
    token: {token}
contexts:
- name: cnikit
  context:
    cluster: cnikit
    user: cnikit
    namespace: default
current-context: cnikit
",
        ca = ca.display()
    )
}

/// The arguments of a kube-apiserver serving the files of `dir` on every address of its
/// namespace at `port`, advertising `advertise`, stored in the etcd at `etcd`: static tokens,
/// RBAC, no request throttling (tests and the lab send bursts of concurrent requests).
pub fn args(dir: &Path, etcd: &str, advertise: &str, port: u16) -> Vec<String> {
    let p = |f: &str| dir.join(f).display().to_string();
    vec![
        format!("--etcd-servers={etcd}"),
        format!("--advertise-address={advertise}"),
        // Every address of its namespace: loopback and the advertised one.
        "--bind-address=0.0.0.0".to_owned(),
        format!("--secure-port={port}"),
        "--insecure-port=0".to_owned(),
        format!("--cert-dir={}", p("certs")),
        format!("--tls-cert-file={}", p("server.crt")),
        format!("--tls-private-key-file={}", p("server.key")),
        format!("--client-ca-file={}", p("ca.crt")),
        format!("--token-auth-file={}", p("tokens.csv")),
        format!("--service-account-key-file={}", p("sa.pub")),
        format!("--service-account-signing-key-file={}", p("sa.key")),
        "--service-account-issuer=https://kubernetes.default.svc".to_owned(),
        "--api-audiences=https://kubernetes.default.svc".to_owned(),
        "--authorization-mode=RBAC".to_owned(),
        "--service-cluster-ip-range=10.96.0.0/16".to_owned(),
        "--enable-priority-and-fairness=false".to_owned(),
        "--max-requests-inflight=2000".to_owned(),
        "--max-mutating-requests-inflight=1000".to_owned(),
        "--disable-admission-plugins=ServiceAccount".to_owned(),
        "--logtostderr=true".to_owned(),
        "--v=0".to_owned(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_and_arguments_agree() {
        let dir = tempfile::tempdir().unwrap();
        write_files(
            dir.path(),
            &["192.0.2.7"],
            &[Token {
                token: "t1",
                user: "system:serviceaccount:kube-system:cnikit-node",
                groups: &[
                    "system:serviceaccounts",
                    "system:serviceaccounts:kube-system",
                ],
            }],
        )
        .unwrap();
        let tokens = fs::read_to_string(dir.path().join("tokens.csv")).unwrap();
        assert_eq!(
            tokens,
            "t1,system:serviceaccount:kube-system:cnikit-node,\
             system:serviceaccount:kube-system:cnikit-node,\
             \"system:serviceaccounts,system:serviceaccounts:kube-system\"\n"
        );
        let mode = |f: &str| {
            fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(""), 0o700, "the directory is its owner's only");
        for secret in ["server.key", "sa.key", "tokens.csv"] {
            assert_eq!(mode(secret), 0o600, "{secret} is its owner's only");
        }
        for arg in args(dir.path(), "http://127.0.0.1:2379", "192.0.2.7", 6443) {
            if let Some((flag, file)) = arg.split_once('=')
                && flag.ends_with("-file")
            {
                assert!(Path::new(file).is_file(), "{arg} names a missing file");
            }
        }
    }
}
