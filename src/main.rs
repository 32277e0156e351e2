fn main() -> std::process::ExitCode {
    authprobe::cmd::main()
}
