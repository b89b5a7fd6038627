//! `turnstile quote` (being written).
use std::process::ExitCode;

#[derive(clap::Subcommand, Debug)]
pub enum QuoteCmd {}

pub fn run(cmd: QuoteCmd) -> ExitCode {
    match cmd {}
}
