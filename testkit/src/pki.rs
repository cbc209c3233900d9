//! A throwaway certificate authority for the peer-tier tests and peer-bench.
//!
//! Peers authenticate each other with mutual TLS, and a peer's certificate
//! must name the node it claims to be (a DNS subjectAltName equal to its
//! node id). Tests need a CA, one such certificate per node, certificates
//! that name someone else, and certificates from a CA the daemons do not
//! trust; this makes all of them as PEM files in a temp dir, so they can be
//! handed to cairnd on its command line like real ones.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A self-signed CA (written as `ca.pem`) and the directory the certificates
/// it issues are written to. Each `TestPki::new()` is an independent CA with
/// a key and a name of its own: a second one is how a test gets a
/// certificate the first CA must reject.
pub struct TestPki {
    /// Holds `ca.pem` and every issued certificate and key; removed on drop.
    dir: tempfile::TempDir,
    /// The CA's certificate with its signing key.
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its private key, as PEM files (the key in PKCS#8).
#[derive(Clone, Debug)]
pub struct NodeCert {
    /// The leaf certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

impl TestPki {
    /// A new CA (ECDSA P-256) in a new temp dir, its certificate written to
    /// [`ca_path`](Self::ca_path).
    pub fn new() -> TestPki {
        let dir = tempfile::tempdir().expect("temp dir for the test PKI");
        let mut params = CertificateParams::new(Vec::<String>::new())
            .expect("a CA without subjectAltNames is valid");
        // A unique name, so that two test CAs are told apart by name as well
        // as by key (and tools do not mistake one for the other's issuer).
        params.distinguished_name.push(
            DnType::CommonName,
            format!("Cairn test CA {}", uuid::Uuid::new_v4()),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("generate the CA key");
        let ca = CertifiedIssuer::self_signed(params, key).expect("self-sign the CA certificate");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write ca.pem");
        TestPki { dir, ca }
    }

    /// The directory holding the CA and every issued file.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate (PEM): the trust anchor to give the daemons.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The certificate of node `node_id` (e.g. `node-a`): its subjectAltName
    /// is the DNS name `node_id`, it is usable as both TLS server and client
    /// certificate, and it is written to `<node_id>.pem` and
    /// `<node_id>.key`.
    pub fn issue(&self, node_id: &str) -> NodeCert {
        self.issue_with_names(node_id, &[node_id])
    }

    /// A certificate whose subjectAltName lists `dns_names` (say, another
    /// node's id, or none of a node's), written to `<file_stem>.pem` and
    /// `<file_stem>.key`. Otherwise like [`issue`](Self::issue).
    pub fn issue_with_names(&self, file_stem: &str, dns_names: &[&str]) -> NodeCert {
        let mut params =
            CertificateParams::new(dns_names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap_or_else(|e| panic!("invalid DNS names {dns_names:?}: {e}"));
        params.distinguished_name.push(
            DnType::CommonName,
            dns_names.first().copied().unwrap_or(file_stem),
        );
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Peers are both: each dials the others and accepts their calls.
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("generate a leaf key");
        let cert = params
            .signed_by(&key, &self.ca)
            .expect("sign the leaf certificate");
        let issued = NodeCert {
            cert: self.dir.path().join(format!("{file_stem}.pem")),
            key: self.dir.path().join(format!("{file_stem}.key")),
        };
        std::fs::write(&issued.cert, cert.pem()).expect("write the certificate");
        std::fs::write(&issued.key, key.serialize_pem()).expect("write the private key");
        issued
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}
