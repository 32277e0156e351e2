use std::process::ExitCode;

use authprobe::{
    check,
    cli::{Cli, Command, RunArgs},
    operator, telemetry,
};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or_else(|| Command::Run(RunArgs::default())) {
        Command::Crd => match authprobe::api::crd_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("authprobe: cannot render the CRD: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Check(args) => {
            telemetry::init(authprobe::cli::LogFormat::Compact);
            match runtime().and_then(|rt| rt.block_on(check::run(args))) {
                Ok(code) => ExitCode::from(code),
                Err(e) => {
                    eprintln!("authprobe check: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Run(args) => {
            telemetry::init(args.log.format);
            match runtime().and_then(|rt| rt.block_on(operator::run(args))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "authprobe stopped");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}
