//! The binary the image ships (`make static`, run by `make test` before the tests): statically
//! linked, runnable on distroless-static, and what the Dockerfile copies.

use std::process::Command;

use authprobe_harness::repo_root;

const STATIC_BINARY: &str = "target/x86_64-unknown-linux-musl/release/authprobe";

/// Whether an ELF file asks for a dynamic loader (has a PT_INTERP program header).
fn has_interpreter(elf: &[u8]) -> bool {
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(elf[4], 2, "not a 64-bit ELF");
    let u16_at = |o: usize| usize::from(u16::from_le_bytes([elf[o], elf[o + 1]]));
    let phoff = usize::try_from(u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap())).unwrap();
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == 3
    })
}

#[test]
fn the_shipped_binary_is_static_and_runs() {
    let path = repo_root().join(STATIC_BINARY);
    let elf = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run `make static` (make test does)", path.display()));
    assert!(!has_interpreter(&elf), "the image binary must be static: distroless-static has no loader");
    let out = Command::new(&path).arg("crd").output().unwrap();
    assert!(out.status.success());
    let committed = std::fs::read_to_string(repo_root().join("crds/authprobe.yaml")).unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), committed, "the static binary is this source");
}

#[test]
fn the_dockerfile_ships_that_binary_as_non_root() {
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    let runtime = dockerfile.rsplit("\nFROM ").next().unwrap();
    assert!(runtime.starts_with("gcr.io/distroless/static"), "{runtime}");
    assert!(runtime.contains(&format!("COPY --from=build /src/{STATIC_BINARY} ")), "{runtime}");
    assert!(runtime.contains("USER 65532:65532"), "{runtime}");
    assert!(dockerfile.contains("RUN make static"));
}

#[test]
fn a_dynamic_binary_is_told_apart() {
    // The test binary itself links glibc dynamically.
    let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    assert!(has_interpreter(&me));
}
