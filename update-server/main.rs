//! `update-server`: not built yet; see the open issues.

fn main() {
    eprintln!("update-server: not built yet; this program arrives with its own issue");
    std::process::exit(3);
}
