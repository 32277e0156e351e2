//! Throw-away keys and certificates for one control plane: a CA, the API server's serving
//! certificate, an admin client certificate (O=system:masters) and ServiceAccount signing keys; for a
//! control plane with a node also the kubelet's client certificate and the API server's client
//! certificate for kubelets.

use std::{fs, path::Path};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, PKCS_RSA_SHA256,
};

/// File names inside the PKI directory.
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const ADMIN_CERT: &str = "admin.crt";
pub const ADMIN_KEY: &str = "admin.key";
/// The API server picks these up from `--cert-dir` instead of generating self-signed ones.
pub const SERVING_CERT: &str = "apiserver.crt";
pub const SERVING_KEY: &str = "apiserver.key";
/// With a node: the kubelet's client certificate (`system:node:NAME`, group `system:nodes`).
pub const KUBELET_CERT: &str = "kubelet.crt";
pub const KUBELET_KEY: &str = "kubelet.key";
/// With a node: the API server's client certificate towards kubelets (logs, exec).
pub const KUBELET_CLIENT_CERT: &str = "apiserver-kubelet-client.crt";
pub const KUBELET_CLIENT_KEY: &str = "apiserver-kubelet-client.key";

/// The node a control plane is started for: its name and the address the API server also serves on.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub name: String,
    pub ip: std::net::Ipv4Addr,
}

/// Writes the CA, serving and admin certificates into `dir`; with `node`, the serving certificate
/// also names the node's address and the two kubelet certificates are written.
pub fn write_certificates(dir: &Path, node: Option<&NodeIdentity>) -> Result<()> {
    fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name = name("authprobe-test-ca", None);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::from_params(&ca, &ca_key);

    let serving_key = KeyPair::generate()?;
    let mut sans = vec![
        "127.0.0.1".to_string(),
        "localhost".to_string(),
        "kubernetes".to_string(),
        "kubernetes.default.svc".to_string(),
        "10.0.0.1".to_string(),
    ];
    sans.extend(node.map(|n| n.ip.to_string()));
    let mut serving = CertificateParams::new(sans)?;
    serving.distinguished_name = name("kube-apiserver", None);
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving_cert = serving.signed_by(&serving_key, &issuer)?;

    let admin_key = KeyPair::generate()?;
    let mut admin = CertificateParams::new(Vec::<String>::new())?;
    admin.distinguished_name = name("admin", Some("system:masters"));
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let admin_cert = admin.signed_by(&admin_key, &issuer)?;

    if let Some(node) = node {
        for (cn, org, cert_file, key_file) in [
            (format!("system:node:{}", node.name), "system:nodes", KUBELET_CERT, KUBELET_KEY),
            (
                "kube-apiserver-kubelet-client".to_string(),
                "system:masters",
                KUBELET_CLIENT_CERT,
                KUBELET_CLIENT_KEY,
            ),
        ] {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.distinguished_name = name(&cn, Some(org));
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            let cert = params.signed_by(&key, &issuer)?;
            fs::write(dir.join(cert_file), cert.pem()).with_context(|| format!("writing {cert_file}"))?;
            fs::write(dir.join(key_file), key.serialize_pem())
                .with_context(|| format!("writing {key_file}"))?;
        }
    }

    for (file, pem) in [
        (CA_CERT, ca_cert.pem()),
        (CA_KEY, ca_key.serialize_pem()),
        (SERVING_CERT, serving_cert.pem()),
        (SERVING_KEY, serving_key.serialize_pem()),
        (ADMIN_CERT, admin_cert.pem()),
        (ADMIN_KEY, admin_key.serialize_pem()),
    ] {
        fs::write(dir.join(file), pem).with_context(|| format!("writing {file}"))?;
    }
    Ok(())
}

/// Writes a new RSA-2048 ServiceAccount signing key (RS256, as Google STS accepts) and returns its path.
pub fn write_signing_key(dir: &Path, generation: u32) -> Result<std::path::PathBuf> {
    let key = KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)?;
    let path = dir.join(format!("sa-{generation}.key"));
    fs::write(&path, key.serialize_pem())?;
    Ok(path)
}

fn name(common_name: &str, organization: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    if let Some(org) = organization {
        dn.push(DnType::OrganizationName, org);
    }
    dn
}
