//! TLS and credentials against a real etcd run with `--client-cert-auth`: the right
//! certificates work; wrong ones fail quickly and clearly; no secret reaches a message.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use cni_core::store::{Store, Txn, TxnOutcome};
use common::Etcd;
use ipam_etcd::{Connection, EtcdStore};

/// Lines of the base64 body of a PEM file: what must never appear in a message.
fn secret_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 16)
        .map(str::to_owned)
        .collect()
}

fn assert_no_secret(text: &str, secrets: &[String]) {
    for s in secrets {
        assert!(!text.contains(s.as_str()), "secret material in {text:?}");
    }
}

/// Everything a person could see of an error: Display, Debug, and the source chain.
fn everything(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = format!("{e} / {e:?}");
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(&format!(" / {s}"));
        next = s.source();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn right_certificates_work() {
    let Some(etcd) = Etcd::start_tls("tls-ok").await else {
        return;
    };
    let store = EtcdStore::connect(&etcd.config()).await.unwrap();
    let key = format!("{}/pool", store.prefix());
    let outcome = store.commit(Txn::new().put(&key, "{}")).await.unwrap();
    assert!(matches!(outcome, TxnOutcome::Committed(_)), "{outcome:?}");
    assert_eq!(store.get(&key).await.unwrap().unwrap().value, b"{}");
    let debug = format!("{store:?}");
    assert_no_secret(&debug, &secret_lines(&etcd.tls().unwrap().client_key));
    assert!(debug.contains(&etcd.endpoint()), "{debug}");
}

/// The server certificate is not signed by the configured CA: a clear error, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_ca_fails_quickly_and_clearly() {
    let Some(etcd) = Etcd::start_tls("tls-wrong-ca").await else {
        return;
    };
    let tls = etcd.tls().unwrap().clone();
    let mut config = etcd.config();
    config.ca_file = Some(tls.other_ca.clone());
    let store = EtcdStore::connect(&config).await.unwrap();
    let started = Instant::now();
    let e = store.get("/x").await.unwrap_err();
    let took = started.elapsed();
    let text = everything(&e);
    eprintln!("wrong CA reported in {took:?}: {text}");
    assert_eq!(e.code().0, 11, "{text}");
    assert!(text.contains(&etcd.endpoint()), "{text}");
    assert!(
        text.contains("UnknownIssuer") || text.contains("certificate"),
        "says it is the certificate: {text}"
    );
    assert!(took < Duration::from_secs(30), "hung for {took:?}");
    assert_no_secret(&text, &secret_lines(&tls.client_key));
}

/// No caFile: the system roots do not know the test CA either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_roots_do_not_trust_a_private_ca() {
    let Some(etcd) = Etcd::start_tls("tls-system-roots").await else {
        return;
    };
    let mut config = etcd.config();
    config.ca_file = None;
    let store = EtcdStore::connect(&config).await.unwrap();
    let e = store.get("/x").await.unwrap_err();
    let text = everything(&e);
    eprintln!("system roots: {text}");
    assert_eq!(e.code().0, 11, "{text}");
    assert!(
        text.contains("certificate") || text.contains("UnknownIssuer"),
        "{text}"
    );
}

/// etcd requires a client certificate: none, or one from another CA, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_is_required() {
    let Some(etcd) = Etcd::start_tls("tls-client-auth").await else {
        return;
    };
    let tls = etcd.tls().unwrap().clone();

    let mut no_cert = etcd.config();
    no_cert.cert_file = None;
    no_cert.key_file = None;
    let store = EtcdStore::connect(&no_cert).await.unwrap();
    let started = Instant::now();
    let e = store.get("/x").await.unwrap_err();
    eprintln!(
        "no client certificate, reported in {:?}: {}",
        started.elapsed(),
        everything(&e)
    );
    assert_eq!(e.code().0, 11);

    let mut stranger = etcd.config();
    stranger.cert_file = Some(tls.stranger_cert.clone());
    stranger.key_file = Some(tls.stranger_key.clone());
    let store = EtcdStore::connect(&stranger).await.unwrap();
    let started = Instant::now();
    let e = store.get("/x").await.unwrap_err();
    let text = everything(&e);
    eprintln!(
        "foreign client certificate, reported in {:?}: {text}",
        started.elapsed()
    );
    assert_eq!(e.code().0, 11);
    assert_no_secret(&text, &secret_lines(&tls.stranger_key));
}

/// Missing, unreadable or wrong key files: code 7 naming the field and path, before any I/O
/// to etcd, without quoting the files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_key_files_are_config_errors() {
    let Some(etcd) = Etcd::start_tls("tls-bad-files").await else {
        return;
    };
    let tls = etcd.tls().unwrap().clone();
    let secrets = [
        secret_lines(&tls.client_key),
        secret_lines(&tls.client_cert),
    ]
    .concat();

    let cases = [
        (
            "missing key",
            None,
            Some(etcd.dir().join("no-such-key.pem")),
            "keyFile",
            "no-such-key.pem",
        ),
        // A directory cannot be read as a file, even by root.
        (
            "unreadable key",
            None,
            Some(etcd.dir().to_owned()),
            "keyFile",
            "cannot read",
        ),
        (
            "certificate as key",
            None,
            Some(tls.client_cert.clone()),
            "keyFile",
            "PRIVATE KEY",
        ),
        (
            "key as certificate",
            Some(tls.client_key.clone()),
            None,
            "certFile",
            "CERTIFICATE",
        ),
    ];
    for (what, cert, key, field, says) in cases {
        let mut config = etcd.config();
        if let Some(c) = cert {
            config.cert_file = Some(c);
        }
        if let Some(k) = key {
            config.key_file = Some(k);
        }
        let started = Instant::now();
        let e = Connection::connect(&config).await.unwrap_err();
        let text = everything(&e);
        eprintln!("{what}: {text} ({:?})", started.elapsed());
        assert_eq!(e.code().0, 7, "{what}: {text}");
        assert!(
            text.contains(&format!("ipam.store.{field}")),
            "{what}: {text}"
        );
        assert!(text.contains(says), "{what}: {text}");
        assert_no_secret(&text, &secrets);
        let store_error: cni_core::StoreError = e.into();
        assert_eq!(store_error.code().0, 7);
    }

    // A CA file that looks like PEM but is not a certificate.
    let bogus = etcd.dir().join("bogus-ca.pem");
    std::fs::write(
        &bogus,
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let mut config = etcd.config();
    config.ca_file = Some(bogus);
    config.cert_file = None;
    config.key_file = None;
    // rustls skips root certificates it cannot parse, so this may only show at the handshake:
    // either way it is refused, quickly, and says why.
    match Connection::connect(&config).await {
        Err(e) => {
            eprintln!("bogus CA at connect: {}", everything(&e));
            assert_eq!(e.code().0, 7, "{e}");
            assert!(e.to_string().contains("ipam.store.caFile"), "{e}");
        }
        Ok(conn) => {
            let e = conn.ping().await.expect_err("no trusted root");
            let text = everything(&e);
            eprintln!("bogus CA at the handshake: {text}");
            assert!(text.contains("UnknownIssuer"), "{text}");
        }
    }

    // A key that does not belong to the certificate: refused by the handshake at the latest.
    let mut mismatched = etcd.config();
    mismatched.key_file = Some(tls.stranger_key.clone());
    let result = match Connection::connect(&mismatched).await {
        Err(e) => Err(e),
        Ok(conn) => conn.ping().await,
    };
    let e = result.expect_err("a mismatched key pair cannot authenticate");
    let text = everything(&e);
    eprintln!("mismatched key: {text}");
    assert_eq!(e.code().0, 7, "{text}");
    assert!(
        text.contains("certFile") && text.contains("keyFile"),
        "{text}"
    );
    assert_no_secret(&text, &[secret_lines(&tls.stranger_key), secrets].concat());
}

/// etcd with authentication: the right password works, a wrong one is code 7, and neither
/// appears in any message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn username_and_password_file() {
    let Some(etcd) = Etcd::start("auth").await else {
        return;
    };
    const PASSWORD: &str = "pw-Zq8vXr2m-never-logged";
    let mut raw = etcd.raw_client().await.unwrap();
    raw.user_add("root", PASSWORD, None).await.unwrap();
    raw.user_grant_role("root", "root").await.unwrap();
    raw.auth_enable().await.unwrap();

    let dir = etcd.dir();
    std::fs::write(dir.join("pw"), format!("{PASSWORD}\n")).unwrap();
    std::fs::write(dir.join("bad-pw"), "not-the-password-K7f").unwrap();

    let mut config = etcd.config();
    config.username = Some("root".into());
    config.password_file = Some(dir.join("pw"));
    let store = EtcdStore::connect(&config).await.unwrap();
    let key = format!("{}/pool", store.prefix());
    store.commit(Txn::new().put(&key, "x")).await.unwrap();
    assert!(store.get(&key).await.unwrap().is_some());
    assert!(!format!("{store:?}").contains(PASSWORD));

    config.password_file = Some(dir.join("bad-pw"));
    let e = Connection::connect(&config).await.unwrap_err();
    let text = everything(&e);
    eprintln!("wrong password: {text}");
    assert_eq!(e.code().0, 7, "{text}");
    assert!(
        !text.contains("not-the-password-K7f") && !text.contains(PASSWORD),
        "{text}"
    );

    // Without credentials, etcd with auth refuses the request itself.
    let plain = EtcdStore::connect(&etcd.config()).await.unwrap();
    let e = plain.get(&key).await.unwrap_err();
    eprintln!(
        "no credentials: {e}: {:?}",
        std::error::Error::source(&e).map(ToString::to_string)
    );
    assert_eq!(e.code().0, 7, "{e}");

    config.password_file = Some(dir.join("no-such-pw"));
    let e = Connection::connect(&config).await.unwrap_err();
    assert_eq!(e.code().0, 7);
    assert!(e.to_string().contains("ipam.store.passwordFile"), "{e}");
}
