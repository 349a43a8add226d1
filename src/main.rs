// Cross-thread frees (a route built on a worker, dropped by the writer) and
// the many small allocations of a miss are cheaper in mimalloc than in
// glibc's malloc; docs/architecture.md "Memory allocator" has the figures.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(ncro::app::main_entry());
}
