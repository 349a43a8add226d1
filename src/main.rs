fn main() {
    std::process::exit(ncro::app::main_entry());
}
