//! The virtual OPQ Box: one qemu machine (x86_64 or aarch64, plain emulation) with its disks, its
//! forwarded ports and its serial console. A `Machine` outlives its boots: each boot is one qemu
//! process (`-no-reboot`, so the guest's own reboot ends it and the harness sees it), and the same
//! disks boot again after a clean reboot or after a `kill`. qemu never outlives the harness: it
//! is killed when its `Boot` drops, and by the kernel if the harness dies (PR_SET_PDEATHSIG).
//!
//! Power cuts: `Boot::kill` is SIGKILL to qemu. The disks are raw files opened with
//! `cache=unsafe`: every write the guest's kernel has sent to the disk is already in the host
//! file (qemu `pwrite`s it before completing the request), and the guest's flushes cost nothing.
//! So a kill loses exactly what the guest had not yet written out (its page cache, and requests
//! still in flight), like a power cut on a disk that keeps what it acknowledged in order. A disk
//! that reorders or drops unflushed writes is what dm-log-writes replays model instead.
//!
//! The console: each boot's serial output goes to its own file (`boot-NN.log` in the log
//! directory), read by `Boot::wait_for` and friends. The guest prints two markers there
//! (tests/system/rootfs/usr/local/sbin/opq-vm-marker): `opq-vm: boot ...` once its disks are
//! mounted and `opq-vm: ready ...` at multi-user.target, each with `current=<link target>`.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    X86_64,
    Aarch64,
}

impl Arch {
    pub fn parse(s: &str) -> Result<Arch> {
        match s {
            "x86_64" | "amd64" => Ok(Arch::X86_64),
            "aarch64" | "arm64" => Ok(Arch::Aarch64),
            _ => bail!("--arch must be x86_64 or aarch64, not {s:?}"),
        }
    }
    pub fn debian(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }
    fn console(self) -> &'static str {
        match self {
            Arch::X86_64 => "ttyS0",
            Arch::Aarch64 => "ttyAMA0",
        }
    }
}

/// A port on the host's 127.0.0.1 forwarded to a guest port.
#[derive(Debug, Clone, Copy)]
pub struct Forward {
    pub host: u16,
    pub guest: u16,
}

/// A guest address (`10.0.2.100:8151`) whose connections go to a host port on 127.0.0.1.
#[derive(Debug, Clone)]
pub struct GuestForward {
    pub guest_ip: String,
    pub guest_port: u16,
    pub host_port: u16,
}

#[derive(Debug, Clone)]
pub struct MachineSpec {
    pub arch: Arch,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Raw disk images, in order: vda (the system), vdb (the box's data), ...
    pub disks: Vec<PathBuf>,
    pub mem_mib: u32,
    pub smp: u32,
    pub forwards: Vec<Forward>,
    pub guest_forwards: Vec<GuestForward>,
    /// Where each boot's console log goes (`boot-01.log`, ...).
    pub log_dir: PathBuf,
    pub extra_cmdline: String,
}

pub struct Machine {
    pub spec: MachineSpec,
    pub boots: u32,
    /// The program qemu runs per guest connection: a link to this very harness, which a rebuild
    /// of the tests (cargo replaces the file) cannot take away in the middle of a run.
    relay: PathBuf,
}

impl Machine {
    pub fn new(spec: MachineSpec) -> Result<Machine> {
        std::fs::create_dir_all(&spec.log_dir)?;
        for f in [&spec.kernel, &spec.initrd]
            .into_iter()
            .chain(spec.disks.iter())
        {
            if !f.is_file() {
                bail!("{} is missing; build the test bed first", f.display());
            }
        }
        let relay = spec.log_dir.join(".relay");
        let exe = std::env::current_exe().context("the harness's own path")?;
        let _ = std::fs::remove_file(&relay);
        if std::fs::hard_link(&exe, &relay).is_err() {
            std::fs::copy(&exe, &relay).context("copying the harness for the relays")?;
        }
        Ok(Machine {
            spec,
            boots: 0,
            relay,
        })
    }

    fn command(&self, serial: &Path) -> Command {
        let s = &self.spec;
        // aarch64: the Raspberry Pi 4's core (the `max` CPU's pointer authentication is slow to
        // emulate).
        let (bin, machine, cpu) = match s.arch {
            Arch::X86_64 => ("qemu-system-x86_64", "pc", "max"),
            Arch::Aarch64 => ("qemu-system-aarch64", "virt", "cortex-a72"),
        };
        let mut c = Command::new(bin);
        c.args([
            "-accel",
            "tcg,thread=multi",
            "-machine",
            machine,
            "-cpu",
            cpu,
        ]);
        c.args(["-m", &s.mem_mib.to_string(), "-smp", &s.smp.to_string()]);
        c.args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]);
        c.arg("-kernel")
            .arg(&s.kernel)
            .arg("-initrd")
            .arg(&s.initrd);
        // The initrd (tests/system/build-rootfs.sh) mounts root= itself. The rest trims the
        // boot under emulation: no speculation mitigations to emulate, one serial port to probe,
        // no clock calibration against the emulated PIT and no check of its timer interrupt (on
        // a loaded host the emulated timer can miss it, and the kernel panics), eth0 for the
        // network unit.
        c.arg("-append").arg(format!(
            "console={} root=/dev/vda rw quiet loglevel=3 systemd.show_status=0 panic=5 \
             net.ifnames=0 mitigations=off 8250.nr_uarts=1 tsc=reliable no_timer_check {}",
            s.arch.console(),
            s.extra_cmdline
        ));
        for d in &s.disks {
            c.arg("-drive").arg(format!(
                "file={},format=raw,if=virtio,cache=unsafe,discard=unmap",
                d.display()
            ));
        }
        // restrict=on: the guest reaches nothing but what is forwarded here, all on 127.0.0.1.
        let mut net = String::from("user,id=net0,restrict=on");
        for f in &s.forwards {
            net.push_str(&format!(",hostfwd=tcp:127.0.0.1:{}-:{}", f.host, f.guest));
        }
        for g in &s.guest_forwards {
            net.push_str(&format!(
                ",guestfwd=tcp:{}:{}-cmd:{} --relay 127.0.0.1 {}",
                g.guest_ip,
                g.guest_port,
                self.relay.display(),
                g.host_port
            ));
        }
        c.arg("-netdev").arg(net);
        c.args(["-device", "virtio-net-pci,netdev=net0"]);
        c.args(["-device", "virtio-rng-pci"]);
        c.arg("-serial").arg(format!("file:{}", serial.display()));
        // The relays' own errors (their stderr is the guest's connection).
        c.env(RELAY_LOG, s.log_dir.join("relay.log"));
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: prctl only sets this process's parent-death signal, between fork and exec.
        unsafe {
            c.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        c
    }

    /// Powers the machine on: a new qemu process on the same disks.
    pub fn boot(&mut self) -> Result<Boot> {
        self.boots += 1;
        let serial = self
            .spec
            .log_dir
            .join(format!("boot-{:02}.log", self.boots));
        std::fs::write(&serial, b"")?;
        let child = self
            .command(&serial)
            .spawn()
            .context("starting qemu (is qemu-system installed?)")?;
        Ok(Boot {
            child: Some(child),
            serial,
            pos: 0,
            pending: String::new(),
            started: Instant::now(),
            number: self.boots,
            exit: None,
        })
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.relay);
    }
}

/// Where relays report what went wrong (qemu passes its environment on to them).
const RELAY_LOG: &str = "OPQ_VM_RELAY_LOG";

/// Appends a line to the relays' log, if there is one.
pub fn relay_log(line: &str) {
    use std::io::Write;
    if let Some(path) = std::env::var_os(RELAY_LOG)
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        let _ = writeln!(f, "{} {line}", opq_update::fsutil::unix_now());
    }
}

/// `--relay HOST PORT`: copies stdin to a TCP connection to 127.0.0.1:PORT and the answer to
/// stdout (qemu hands the guest's connection over as both), until both sides are done.
pub fn relay(port: u16) -> Result<()> {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    // A relay lives as long as the qemu that started it: a power cut ends its connections too.
    // SAFETY: prctl only sets this process's parent-death signal.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port))?;
    let mut up = tcp.try_clone()?;
    // SAFETY: fds 0 and 1 are this process's own, opened by qemu for it, and used only here.
    let mut input = unsafe { std::fs::File::from_raw_fd(0) };
    let mut output = unsafe { std::fs::File::from_raw_fd(1) };
    let upload = std::thread::spawn(move || {
        let _ = std::io::copy(&mut input, &mut up);
        let _ = up.shutdown(std::net::Shutdown::Write);
    });
    let mut down = tcp;
    let _ = std::io::copy(&mut down, &mut output);
    let _ = output.flush();
    // The guest's side may linger after the answer; it has nothing more to say to a closed one.
    drop(upload);
    Ok(())
}

/// One power-on of the machine: a qemu process and its console log.
pub struct Boot {
    child: Option<Child>,
    pub serial: PathBuf,
    pos: u64,
    pending: String,
    pub started: Instant,
    pub number: u32,
    exit: Option<ExitStatus>,
}

impl Boot {
    /// Whether qemu still runs (the guest has not rebooted, powered off or been killed).
    pub fn running(&mut self) -> bool {
        if self.exit.is_some() {
            return false;
        }
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(Ok(Some(st))) => {
                self.exit = Some(st);
                false
            }
            _ => false,
        }
    }

    /// New complete console lines since the last call.
    pub fn new_lines(&mut self) -> Vec<String> {
        let mut buf = Vec::new();
        if let Ok(mut f) = std::fs::File::open(&self.serial)
            && f.seek(SeekFrom::Start(self.pos)).is_ok()
            && let Ok(n) = f.read_to_end(&mut buf)
        {
            self.pos += n as u64;
        }
        self.pending.push_str(&String::from_utf8_lossy(&buf));
        let mut lines = Vec::new();
        while let Some(i) = self.pending.find('\n') {
            let line: String = self.pending.drain(..=i).collect();
            lines.push(line.trim_end_matches(['\r', '\n']).to_string());
        }
        lines
    }

    /// Waits for a console line containing `needle`; fails if qemu exits first or on timeout.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        self.wait_for_any(&[needle], timeout).map(|(_, line)| line)
    }

    /// Waits for the first console line containing any of `needles`: (which one, the line).
    /// Fails if qemu exits first or on timeout.
    pub fn wait_for_any(&mut self, needles: &[&str], timeout: Duration) -> Result<(usize, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            let down = !self.running();
            // After an exit, the last lines may have landed after the previous read.
            for line in self.new_lines() {
                if let Some(i) = needles.iter().position(|n| line.contains(n)) {
                    return Ok((i, line));
                }
            }
            if down {
                let note = self.stderr_note();
                bail!(
                    "the machine went down (boot {}, {:?}) before the console said any of {needles:?}{note}",
                    self.number,
                    self.exit,
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "the console did not say any of {needles:?} within {} s (boot {})",
                    timeout.as_secs(),
                    self.number
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the guest ends this boot by itself (a reboot or a power-off).
    pub fn wait_down(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while self.running() {
            if Instant::now() >= deadline {
                bail!(
                    "the machine did not reboot within {} s (boot {})",
                    timeout.as_secs(),
                    self.number
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(self.exit.expect("exited"))
    }

    /// Cuts the power: SIGKILL to qemu, so whatever the guest had not written is lost (see the
    /// module's note). Returns once qemu is gone: its disk images may be read or booted again.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            if let Ok(st) = c.wait() {
                self.exit = Some(st);
            }
        }
    }

    /// The whole console log of this boot.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// The last `n` console lines, for a failure message.
    pub fn console_tail(&self, n: usize) -> String {
        let text = self.console();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn stderr_note(&mut self) -> String {
        let mut err = String::new();
        if let Some(c) = self.child.as_mut()
            && let Some(e) = c.stderr.as_mut()
        {
            let _ = e.read_to_string(&mut err);
        }
        if err.trim().is_empty() {
            String::new()
        } else {
            format!("; qemu said: {}", err.trim())
        }
    }
}

impl Drop for Boot {
    fn drop(&mut self) {
        self.kill();
    }
}
