//! The `hubgate` binary; see [`hubgate::cli`].

fn main() -> std::process::ExitCode {
    hubgate::cli::main()
}
