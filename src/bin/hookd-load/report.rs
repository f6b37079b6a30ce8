//! The report: the machine the figures were taken on, and one table row per figure with the
//! median of its runs, the target, and whether the median meets it.

use std::fmt;

/// Where the figures were measured; printed above the table.
pub struct Machine {
    /// Cores this process may run on (`nproc`).
    cores: usize,
    /// `model name` of /proc/cpuinfo.
    model: String,
    /// `MemTotal` of /proc/meminfo.
    memory: String,
    /// `uname -r`, because the kernel changes fsync and network costs.
    kernel: String,
    /// The checkout's commit when the harness ran (run it from the checkout it was built
    /// from), and when this binary was built.
    commit: String,
    built: String,
}

impl Machine {
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let field = |text: &str, name: &str| {
            text.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_once(':')).map(|(_, v)| v.trim().to_string())
        };
        let memory = field(&meminfo, "MemTotal")
            .and_then(|v| v.trim_end_matches(" kB").trim().parse::<f64>().ok())
            .map_or_else(|| "unknown".into(), |kb| format!("{:.1} GiB", kb / 1024.0 / 1024.0));
        let run = |cmd: &str, args: &[&str]| {
            std::process::Command::new(cmd)
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_else(|| "unknown".into())
        };
        let dirty = run("git", &["status", "--porcelain", "--untracked-files=no"]);
        let mut commit = run("git", &["rev-parse", "--short", "HEAD"]);
        if !dirty.is_empty() && dirty != "unknown" {
            commit.push_str(" (with uncommitted changes)");
        }
        let built = std::env::current_exe()
            .and_then(std::fs::metadata)
            .and_then(|m| m.modified())
            .map(|t| chrono::DateTime::<chrono::Utc>::from(t).format("%Y-%m-%d %H:%M UTC").to_string())
            .unwrap_or_else(|_| "unknown".into());
        Self {
            built,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            model: field(&cpuinfo, "model name").unwrap_or_else(|| "unknown".into()),
            memory,
            kernel: run("uname", &["-r"]),
            commit,
        }
    }
}

impl fmt::Display for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "machine: {} cores, {}, {} memory, Linux {}", self.cores, self.model, self.memory, self.kernel)?;
        let profile = if cfg!(debug_assertions) { "debug build (figures not comparable)" } else { "release build" };
        write!(f, "hookd:   checkout at {}; {profile} of {}", self.commit, self.built)
    }
}

/// What a figure should reach.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    AtLeast(f64),
    Below(f64),
}

impl Target {
    fn met(self, v: f64) -> bool {
        match self {
            Target::AtLeast(t) => v >= t,
            Target::Below(t) => v < t,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::AtLeast(t) => write!(f, ">= {}", num(*t)),
            Target::Below(t) => write!(f, "< {}", num(*t)),
        }
    }
}

/// One figure of one scenario, over all runs.
#[derive(Clone, Debug)]
pub struct Row {
    pub scenario: &'static str,
    pub figure: &'static str,
    pub unit: &'static str,
    pub values: Vec<f64>,
    pub target: Option<Target>,
}

impl Row {
    pub fn new(scenario: &'static str, figure: &'static str, unit: &'static str, target: Option<Target>) -> Self {
        Self { scenario, figure, unit, values: Vec::new(), target }
    }

    pub fn median(&self) -> f64 {
        median(&self.values)
    }

    /// One line for the progress log.
    pub fn summary(&self) -> String {
        let runs: Vec<String> = self.values.iter().map(|v| num(*v)).collect();
        format!("{} / {}: median {} {} (runs: {})", self.scenario, self.figure, num(self.median()), self.unit, runs.join(", "))
    }
}

/// The median (mean of the middle two for an even count); NaN for no values.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A number for people: no more digits than it deserves.
pub fn num(v: f64) -> String {
    if v.is_nan() {
        return "-".into();
    }
    let a = v.abs();
    if a >= 1000.0 {
        let s = format!("{:.0}", v);
        let (sign, digits) = s.split_at(usize::from(s.starts_with('-')));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Every row of every scenario run.
#[derive(Default)]
pub struct Table {
    rows: Vec<Row>,
}

impl Table {
    pub fn extend(&mut self, rows: Vec<Row>) {
        self.rows.extend(rows);
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let head = ["scenario", "figure", "unit", "median", "runs", "target", "met?"];
        let cells: Vec<[String; 7]> = self
            .rows
            .iter()
            .map(|r| {
                let m = r.median();
                let (target, met) = match r.target {
                    Some(t) if m.is_nan() => (t.to_string(), "-".to_string()),
                    Some(t) => (t.to_string(), if t.met(m) { "yes" } else { "NO" }.to_string()),
                    None => ("-".into(), "-".into()),
                };
                [r.scenario.into(), r.figure.into(), r.unit.into(), num(m), r.values.len().to_string(), target, met]
            })
            .collect();
        let mut width = head.map(str::len);
        for c in &cells {
            for (w, s) in width.iter_mut().zip(c) {
                *w = (*w).max(s.chars().count());
            }
        }
        let line = |f: &mut fmt::Formatter<'_>, c: &[String]| {
            let parts: Vec<String> =
                c.iter().zip(width).enumerate().map(|(i, (s, w))| if i == 3 { format!("{s:>w$}") } else { format!("{s:<w$}") }).collect();
            writeln!(f, "{}", parts.join(" | ").trim_end())
        };
        line(f, &head.map(String::from))?;
        writeln!(f, "{}", width.map(|w| "-".repeat(w)).join("-|-"))?;
        for c in &cells {
            line(f, c)?;
        }
        writeln!(f)?;
        writeln!(f, "per run:")?;
        for r in &self.rows {
            let runs: Vec<String> = r.values.iter().map(|v| num(*v)).collect();
            writeln!(f, "  {} / {}: {}", r.scenario, r.figure, runs.join(", "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_numbers() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(num(1_234_567.4), "1,234,567");
        assert_eq!(num(-1234.0), "-1,234");
        assert_eq!(num(12.345), "12.3");
        assert_eq!(num(0.8123), "0.81");
    }
}
