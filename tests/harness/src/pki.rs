//! Throw-away keys and certificates for one control plane: a CA, the API server's serving
//! certificate, an admin client certificate (O=system:masters) and ServiceAccount signing keys.

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

/// Writes the CA, serving and admin certificates into `dir`.
pub fn write_certificates(dir: &Path) -> Result<()> {
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
    let mut serving = CertificateParams::new(vec![
        "127.0.0.1".to_string(),
        "localhost".to_string(),
        "kubernetes".to_string(),
        "kubernetes.default.svc".to_string(),
        "10.0.0.1".to_string(),
    ])?;
    serving.distinguished_name = name("kube-apiserver", None);
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving_cert = serving.signed_by(&serving_key, &issuer)?;

    let admin_key = KeyPair::generate()?;
    let mut admin = CertificateParams::new(Vec::<String>::new())?;
    admin.distinguished_name = name("admin", Some("system:masters"));
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let admin_cert = admin.signed_by(&admin_key, &issuer)?;

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
