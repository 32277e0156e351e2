use std::process::ExitCode;

use authprobe::cli::{Cli, Command};
use clap::Parser;

fn main() -> ExitCode {
    match Cli::parse().command {
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
    }
}
