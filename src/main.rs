fn main() -> std::process::ExitCode {
    portal::cli::main()
}
