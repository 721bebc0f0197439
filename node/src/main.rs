//! The `peerbuild` binary: thin glue over the `node` library.

fn main() -> std::process::ExitCode {
    node::cli::main()
}
