//! The command line: one engine, several modes.

use clap::{Parser, Subcommand};

/// Proves, per namespace, that Kubernetes ServiceAccounts can still become their Google identities.
#[derive(Debug, Parser)]
#[command(name = "authprobe", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The modes.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the AuthProbe CRD as YAML (what crds/authprobe.yaml holds).
    Crd,
}
