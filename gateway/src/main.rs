//! The `hubgate` binary; see [`hubgate::tools::cli`].

fn main() -> std::process::ExitCode {
    hubgate::tools::cli::main()
}
