//! The `kvferry` command (see [`kvferry_cli::cli`]).

fn main() {
    // Rust ignores SIGPIPE, so output cut short by a closed pipe (`kvferry info | head`) would end
    // in a panic; like other commands, this one ends quietly instead.
    // SAFETY: before any other thread exists; SIG_DFL is a valid disposition for SIGPIPE.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    std::process::exit(kvferry_cli::cli::run(std::env::args_os()));
}
