//! CPU time of processes (alone, or with their descendants) and of the whole machine, from /proc: how
//! the OpenSearch section shows whether the machine's cores, rather than monsoon, set the pace.

use std::time::Instant;

/// CPU seconds (user + system) `pid` used so far, alone; 0 once it is gone.
pub fn own_seconds(pid: u32) -> f64 {
    stat_of(pid).map_or(0.0, |(_, secs)| secs)
}

/// CPU seconds (user + system) `pid` and every process below it used so far; 0 once it is gone.
pub fn tree_seconds(pid: u32) -> f64 {
    let mut stats: Vec<(u32, u32, f64)> = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0.0 };
    for entry in dir.flatten() {
        let Some(p) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if let Some((ppid, secs)) = stat_of(p) {
            stats.push((p, ppid, secs));
        }
    }
    let mut tree = vec![pid];
    let mut total = 0.0;
    while let Some(p) = tree.pop() {
        for &(child, ppid, secs) in &stats {
            if child == p {
                total += secs;
            }
            if ppid == p {
                tree.push(child);
            }
        }
    }
    total
}

/// (parent pid, CPU seconds) of one process.
pub fn stat_of(pid: u32) -> Option<(u32, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the command: state 0, ppid 1, utime 11, stime 12 (fields 3, 14, 15 of stat).
    let ppid = fields.get(1)?.parse().ok()?;
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some((ppid, ticks / super::clock_ticks()))
}

/// The machine's cores.
pub fn cores() -> f64 {
    std::thread::available_parallelism().map_or(1, usize::from) as f64
}

/// CPU seconds the whole machine spent busy (anything but idle and waiting on I/O), from the
/// first line of /proc/stat.
fn machine_busy() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat.lines().next().unwrap_or_default().split_whitespace().skip(1).filter_map(|t| t.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is counted in user already).
    let busy: f64 = ticks.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, t)| t).sum();
    busy / super::clock_ticks()
}

/// A process a [`Meter`] watches.
#[derive(Clone, Copy)]
pub enum Watched {
    /// The process and every process below it (a server and whatever it starts).
    Tree(u32),
    /// The process alone (the bench, whose children are the servers).
    Alone(u32),
}

impl Watched {
    fn seconds(self) -> f64 {
        match self {
            Self::Tree(pid) => tree_seconds(pid),
            Self::Alone(pid) => own_seconds(pid),
        }
    }
}

/// CPU used from [`Meter::start`] on: by each watched process and by the whole machine.
pub struct Meter {
    pids: Vec<Watched>,
    at_start: Vec<f64>,
    machine_at_start: f64,
    started: Instant,
}

/// What a [`Meter`] read.
pub struct Reading {
    /// CPU seconds of each watched process, in the order given.
    pub seconds: Vec<f64>,
    /// The machine's busy share of all its cores over the wall time, 0–1.
    pub busy: f64,
}

impl Meter {
    /// Start measuring `pids` and the machine.
    pub fn start(pids: &[Watched]) -> Self {
        Self { pids: pids.to_vec(), at_start: pids.iter().map(|p| p.seconds()).collect(), machine_at_start: machine_busy(), started: Instant::now() }
    }

    /// CPU used since the start.
    pub fn read(&self) -> Reading {
        let wall = self.started.elapsed().as_secs_f64();
        let seconds = self.pids.iter().zip(&self.at_start).map(|(p, s)| (p.seconds() - s).max(0.0)).collect();
        Reading { seconds, busy: (machine_busy() - self.machine_at_start) / (wall * cores()) }
    }
}
