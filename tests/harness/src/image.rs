//! Container images without a registry: an OCI image archive (`oci-layout`, `index.json`, one
//! manifest, one config and one uncompressed layer blob) around a single static binary, for
//! `ctr images import` and `imagePullPolicy: Never`.
//!
//! The archive is reproducible: the same binary and reference give the same bytes (every time
//! stamp is zero), so the same image ID.

use std::{fs, path::Path};

use anyhow::{Context, Result, bail};
use serde_json::json;
use sha2::{Digest, Sha256};

const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

/// Normalizes an image reference the way the kubelet and containerd do: `authprobe:dev` is
/// `docker.io/library/authprobe:dev`, a name without a tag gets `:latest`.
pub fn normalize_reference(reference: &str) -> Result<String> {
    if reference.is_empty() || reference.contains('@') || reference.chars().any(char::is_whitespace) {
        bail!("unsupported image reference {reference:?} (use NAME[:TAG])");
    }
    let (first, rest) = reference.split_once('/').unwrap_or(("", reference));
    let named = if first.contains('.') || first.contains(':') || first == "localhost" {
        reference.to_string()
    } else if first.is_empty() {
        format!("docker.io/library/{rest}")
    } else {
        format!("docker.io/{reference}")
    };
    let last = named.rsplit('/').next().unwrap_or_default();
    Ok(if last.contains(':') { named } else { format!("{named}:latest") })
}

/// Writes an OCI image archive to `out`: `binary` as the image's only file, `/<its file name>`
/// (mode 0755), next to an empty `/tmp` (mode 1777); the entrypoint is that file, `cmd` the
/// default arguments. Named `reference` (normalized, see [`normalize_reference`]) for `ctr images import`.
pub fn write_oci_archive(binary: &Path, reference: &str, cmd: &[&str], out: &Path) -> Result<()> {
    let name = normalize_reference(reference)?;
    let tag = name.rsplit_once(':').map(|(_, t)| t.to_string()).unwrap_or_default();
    let file_name = binary
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no file name", binary.display()))?
        .to_string();
    let content = fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;

    let mut layer = Tar::default();
    layer.dir("tmp/", 0o1777)?;
    layer.file(&file_name, 0o755, &content)?;
    let layer = layer.finish();
    let layer_digest = sha256(&layer);

    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Entrypoint": [format!("/{file_name}")],
            "Cmd": cmd,
            "Env": ["PATH=/"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": format!("authprobe-harness: {file_name}")}],
    }))?;
    let config_digest = sha256(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": MEDIA_LAYER, "digest": layer_digest, "size": layer.len()}],
    }))?;
    let manifest_digest = sha256(&manifest);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [{
            "mediaType": MEDIA_MANIFEST,
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    }))?;

    let mut archive = Tar::default();
    archive.file("oci-layout", 0o644, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    archive.file("index.json", 0o644, &index)?;
    archive.dir("blobs/", 0o755)?;
    archive.dir("blobs/sha256/", 0o755)?;
    for (digest, blob) in [(&layer_digest, &layer), (&config_digest, &config), (&manifest_digest, &manifest)]
    {
        let hex = digest.trim_start_matches("sha256:");
        archive.file(&format!("blobs/sha256/{hex}"), 0o644, blob)?;
    }
    fs::write(out, archive.finish()).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

fn sha256(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut hex = String::with_capacity(71);
    hex.push_str("sha256:");
    for b in digest {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

/// A minimal ustar writer: regular files and directories, owned by root, time stamp zero.
#[derive(Default)]
struct Tar {
    bytes: Vec<u8>,
}

impl Tar {
    fn dir(&mut self, path: &str, mode: u32) -> Result<()> {
        self.entry(path, mode, b'5', &[])
    }

    fn file(&mut self, path: &str, mode: u32, content: &[u8]) -> Result<()> {
        self.entry(path, mode, b'0', content)
    }

    fn entry(&mut self, path: &str, mode: u32, kind: u8, content: &[u8]) -> Result<()> {
        if path.len() > 100 {
            bail!("tar path {path:?} is longer than 100 bytes");
        }
        let mut header = [0u8; 512];
        header[..path.len()].copy_from_slice(path.as_bytes());
        octal(&mut header[100..108], u64::from(mode));
        octal(&mut header[108..116], 0); // uid
        octal(&mut header[116..124], 0); // gid
        octal(&mut header[124..136], content.len() as u64);
        octal(&mut header[136..148], 0); // mtime
        header[148..156].fill(b' ');
        header[156] = kind;
        header[257..263].copy_from_slice(b"ustar\0");
        header[263..265].copy_from_slice(b"00");
        header[265..269].copy_from_slice(b"root");
        header[297..301].copy_from_slice(b"root");
        let sum: u32 = header.iter().map(|b| u32::from(*b)).sum();
        let field = format!("{sum:06o}\0 ");
        header[148..156].copy_from_slice(field.as_bytes());
        self.bytes.extend_from_slice(&header);
        self.bytes.extend_from_slice(content);
        let pad = (512 - content.len() % 512) % 512;
        self.bytes.resize(self.bytes.len() + pad, 0);
        Ok(())
    }

    fn finish(mut self) -> Vec<u8> {
        self.bytes.resize(self.bytes.len() + 1024, 0);
        self.bytes
    }
}

/// Writes `value` as zero-padded octal digits followed by NUL into `field`.
fn octal(field: &mut [u8], value: u64) {
    let width = field.len() - 1;
    let digits = format!("{value:0width$o}");
    field[..width].copy_from_slice(&digits.as_bytes()[digits.len() - width..]);
    field[width] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_normalize_like_containerd() {
        let n = |r| normalize_reference(r).unwrap_or_default();
        assert_eq!(n("authprobe:dev"), "docker.io/library/authprobe:dev");
        assert_eq!(n("authprobe"), "docker.io/library/authprobe:latest");
        assert_eq!(n("team/app:1"), "docker.io/team/app:1");
        assert_eq!(n("registry.local/app:1"), "registry.local/app:1");
        assert_eq!(n("localhost:5000/app"), "localhost:5000/app:latest");
        assert!(normalize_reference("app@sha256:00").is_err());
    }

    #[test]
    fn archive_is_a_valid_tar_and_reproducible() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let bin = dir.path().join("hello");
        fs::write(&bin, b"#!not really\n")?;
        let (a, b) = (dir.path().join("a.tar"), dir.path().join("b.tar"));
        write_oci_archive(&bin, "hello:dev", &[], &a)?;
        write_oci_archive(&bin, "hello:dev", &[], &b)?;
        assert_eq!(fs::read(&a)?, fs::read(&b)?);
        let listing = std::process::Command::new("tar").arg("-tvf").arg(&a).output()?;
        assert!(listing.status.success(), "{}", String::from_utf8_lossy(&listing.stderr));
        let listing = String::from_utf8_lossy(&listing.stdout);
        assert!(listing.contains("index.json") && listing.contains("oci-layout"), "{listing}");
        let blobs = listing.lines().filter(|l| l.starts_with('-') && l.contains("blobs/sha256/")).count();
        assert_eq!(blobs, 3, "a manifest, a config and a layer: {listing}");
        Ok(())
    }
}
