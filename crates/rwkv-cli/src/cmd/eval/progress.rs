//! A progress line on stderr: done/total, rate, ETA and running accuracy.
//!
//! On a terminal the line redraws in place (carriage return) at most every 200 ms; otherwise (a
//! log file, a test capturing stderr) a plain line is written every 5 s, so logs stay short.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    total: usize,
    done: usize,
    correct: usize,
    started: Instant,
    last_draw: Option<Instant>,
    tty: bool,
}

impl Progress {
    pub fn new(total: usize) -> Self {
        Self {
            total,
            done: 0,
            correct: 0,
            started: Instant::now(),
            last_draw: None,
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// One more question finished.
    pub fn tick(&mut self, correct: bool) {
        self.done += 1;
        self.correct += usize::from(correct);
        let every = if self.tty {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(5)
        };
        if self.last_draw.is_none_or(|t| t.elapsed() >= every) {
            self.draw();
        }
    }

    /// The final line (always drawn), ending the in-place line.
    pub fn finish(&mut self) {
        if self.total > 0 {
            self.draw();
            if self.tty {
                eprintln!();
            }
        }
    }

    fn draw(&mut self) {
        self.last_draw = Some(Instant::now());
        let elapsed = self.started.elapsed().as_secs_f64();
        let rate = self.done as f64 / elapsed.max(1e-9);
        let eta = if self.done == 0 {
            "?".to_owned()
        } else {
            format_duration((self.total - self.done) as f64 / rate)
        };
        let accuracy = 100.0 * self.correct as f64 / self.done.max(1) as f64;
        let line = format!(
            "[eval] {}/{} ({:.1}%)  {rate:.2} q/s  ETA {eta}  accuracy {accuracy:.1}%",
            self.done,
            self.total,
            100.0 * self.done as f64 / self.total.max(1) as f64,
        );
        let mut err = std::io::stderr().lock();
        let _ = if self.tty {
            // Trailing spaces clear what a longer previous line left.
            write!(err, "\r{line}    ")
        } else {
            writeln!(err, "{line}")
        };
        let _ = err.flush();
    }
}

/// `1h02m`, `3m05s`, `12s`.
pub fn format_duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_read_naturally() {
        assert_eq!(super::format_duration(12.4), "12s");
        assert_eq!(super::format_duration(185.0), "3m05s");
        assert_eq!(super::format_duration(3720.0), "1h02m");
    }
}
