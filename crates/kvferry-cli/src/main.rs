//! The `kvferry` command (see [`kvferry_cli::cli`]).

fn main() {
    std::process::exit(kvferry_cli::cli::run(std::env::args_os()));
}
