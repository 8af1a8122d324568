//! The `hubgate` binary's entry point, built in this package for the end-to-end tests.

fn main() -> std::process::ExitCode {
    hubgate::tools::cli::main()
}
