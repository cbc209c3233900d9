//! Mutual TLS between daemons, and who a caller of the peer service is.
//!
//! Every daemon has one certificate, signed by the cluster's CA, whose
//! subjectAltName is its node id (a DNS name, as Kubernetes node names are).
//! The same certificate serves and dials: the server asks every caller for a
//! certificate from the CA (rustls refuses anything else during the
//! handshake), and a dialer checks that the server's certificate names the
//! node it meant to reach. On top of the handshake, each request names its
//! sender in the [`NODE_HEADER`] header and [`authenticate`] checks that the
//! certificate names that node too, so a node cannot pass itself off as
//! another (the owner recorded with a replica, the membership check).

use std::path::{Path, PathBuf};

use cairn_core::NodeId;
use rustls_pki_types::{CertificateDer, ServerName};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::error::{Error, IoContext, Result};

/// The request header in which a caller names its node.
pub const NODE_HEADER: &str = "x-cairn-node";

/// The certificate, key and CA files of the peer tier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// This node's certificate chain (PEM), naming the node id.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA that signs every node's certificate (PEM).
    pub ca: PathBuf,
}

/// Loaded TLS material, ready to configure the server and each channel.
#[derive(Clone, Debug)]
pub struct PeerTls {
    identity: Identity,
    ca: Certificate,
}

fn read_pem(what: &str, path: &Path) -> Result<Vec<u8>> {
    let bytes =
        std::fs::read(path).io_context(|| format!("reading the peer {what} {}", path.display()))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(Error::InvalidArgument(format!(
            "peers.tls: {} is not a PEM file (no '-----BEGIN' line); the {what} must be PEM",
            path.display()
        )));
    }
    Ok(bytes)
}

impl PeerTls {
    /// Reads the files, failing with a message that names the file at
    /// fault. The certificate itself is checked by rustls when the server
    /// starts.
    pub fn load(files: &TlsFiles) -> Result<Self> {
        let cert = read_pem("certificate", &files.cert)?;
        let key = read_pem("key", &files.key)?;
        let ca = read_pem("CA certificate", &files.ca)?;
        Ok(Self {
            identity: Identity::from_pem(cert, key),
            ca: Certificate::from_pem(ca),
        })
    }

    /// The server side: present our certificate, require one from the CA.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
    }

    /// The dialing side towards `node`: trust only the CA, require the
    /// server's certificate to name `node`, present our own.
    pub fn client(&self, node: &NodeId) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
            .domain_name(node.as_str())
    }
}

/// Who sent a request to the peer service: the node named in
/// [`NODE_HEADER`], checked against the TLS client certificate when the
/// tier runs with TLS (`certs` is what the connection presented).
pub fn authenticate(
    header: Option<&str>,
    certs: Option<&[CertificateDer<'static>]>,
    tls: bool,
) -> Result<NodeId> {
    let Some(claimed) = header else {
        return Err(Error::Unauthenticated(format!(
            "peer request without the {NODE_HEADER} header naming the calling node"
        )));
    };
    let node = NodeId::parse(NODE_HEADER, claimed.to_owned())
        .map_err(|e| Error::Unauthenticated(e.to_string()))?;
    if !tls {
        return Ok(node);
    }
    let Some(leaf) = certs.and_then(|c| c.first()) else {
        return Err(Error::Unauthenticated(format!(
            "peer request from {node} without a client certificate"
        )));
    };
    certificate_names(leaf, &node)?;
    Ok(node)
}

/// Checks that the certificate's subjectAltName covers `node`.
fn certificate_names(cert: &CertificateDer<'_>, node: &NodeId) -> Result<()> {
    let refuse = |why: String| {
        Error::Unauthenticated(format!(
            "the client certificate does not prove it is node {node}: {why}"
        ))
    };
    let parsed = webpki::EndEntityCert::try_from(cert).map_err(|e| refuse(format!("{e:?}")))?;
    let name = ServerName::try_from(node.as_str()).map_err(|e| refuse(e.to_string()))?;
    parsed
        .verify_is_valid_for_subject_name(&name)
        .map_err(|_| refuse("its subjectAltName does not name that node".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_malformed_header_is_refused() {
        let err = authenticate(None, None, false).expect_err("refused");
        assert!(err.to_string().contains(NODE_HEADER), "{err}");
        let err = authenticate(Some("Not A Node"), None, false).expect_err("refused");
        assert!(matches!(err, Error::Unauthenticated(_)), "{err:?}");
    }

    #[test]
    fn insecure_mode_takes_the_header_and_tls_mode_wants_a_certificate() {
        let node = authenticate(Some("node-a"), None, false).expect("insecure");
        assert_eq!(node.as_str(), "node-a");
        let err = authenticate(Some("node-a"), None, true).expect_err("refused");
        assert!(
            err.to_string().contains("without a client certificate"),
            "{err}"
        );
    }

    #[test]
    fn garbage_certificates_are_refused() {
        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        let err = authenticate(Some("node-a"), Some(&[garbage]), true).expect_err("refused");
        assert!(matches!(err, Error::Unauthenticated(_)), "{err:?}");
    }
}
