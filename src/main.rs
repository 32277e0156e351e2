// `--features mimalloc`: mimalloc instead of the platform allocator, to measure the difference.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    authprobe::cmd::main()
}
