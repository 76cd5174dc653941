//! Named fault points for the fault-injection suite. Compiled in only with the `fault-injection`
//! feature; a point named in `OPQ_FAULT` kills the process on the spot, as a power cut or an
//! OOM kill would. `OPQ_FAULT=name` fires at a point, `OPQ_FAULT=name@N` once progress reaches N.

#[cfg(feature = "fault-injection")]
mod imp {
    use std::sync::OnceLock;

    fn spec() -> Option<&'static (String, Option<u64>)> {
        static SPEC: OnceLock<Option<(String, Option<u64>)>> = OnceLock::new();
        SPEC.get_or_init(|| {
            let v = std::env::var("OPQ_FAULT").ok()?;
            Some(match v.split_once('@') {
                Some((n, at)) => (n.to_string(), at.parse().ok()),
                None => (v, None),
            })
        })
        .as_ref()
    }

    fn die(name: &str) -> ! {
        eprintln!("fault injected at {name}");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        std::process::abort()
    }

    pub fn point(name: &str) {
        if let Some((n, None)) = spec()
            && n == name
        {
            die(name)
        }
    }

    pub fn point_at(name: &str, progress: u64) {
        if let Some((n, Some(at))) = spec()
            && n == name
            && progress >= *at
        {
            die(name)
        }
    }
}

#[cfg(not(feature = "fault-injection"))]
mod imp {
    #[inline(always)]
    pub fn point(_: &str) {}
    #[inline(always)]
    pub fn point_at(_: &str, _: u64) {}
}

pub use imp::{point, point_at};
