//! Named fault points for the fault-injection suite. Compiled in only with the `fault-injection`
//! feature; a point named in `OPQ_FAULT` kills the process on the spot, as a power cut or an
//! OOM kill would. `OPQ_FAULT=name` fires at a point, `OPQ_FAULT=name@N` once progress reaches N.
//! `OPQ_FAULT_TRACE=FILE` writes `opq-fault-point: name` to FILE as each named point is passed,
//! before anything else happens there (the virtual box's power cuts use `/dev/console`: the
//! serial console tells the harness, with no journal in between, which step an update is at).
//! `OPQ_FAULT_SLOW=name:MS` sleeps MS milliseconds at each progress point of that name, so that a
//! test watching a step from outside sees it however fast the machine does it.

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

    fn trace(name: &str) {
        use std::io::Write;
        use std::sync::Mutex;
        static TRACE: OnceLock<Option<Mutex<std::fs::File>>> = OnceLock::new();
        let file = TRACE.get_or_init(|| {
            let path = std::env::var_os("OPQ_FAULT_TRACE")?;
            std::fs::OpenOptions::new()
                .append(true)
                .open(path)
                .ok()
                .map(Mutex::new)
        });
        if let Some(f) = file {
            let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
            let _ = f.write_all(format!("opq-fault-point: {name}\n").as_bytes());
        }
    }

    pub fn point(name: &str) {
        trace(name);
        if let Some((n, None)) = spec()
            && n == name
        {
            die(name)
        }
    }

    fn slow() -> Option<&'static (String, u64)> {
        static SLOW: OnceLock<Option<(String, u64)>> = OnceLock::new();
        SLOW.get_or_init(|| {
            let v = std::env::var("OPQ_FAULT_SLOW").ok()?;
            let (n, ms) = v.split_once(':')?;
            Some((n.to_string(), ms.parse().ok()?))
        })
        .as_ref()
    }

    pub fn point_at(name: &str, progress: u64) {
        if let Some((n, ms)) = slow()
            && n == name
        {
            std::thread::sleep(std::time::Duration::from_millis(*ms));
        }
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
