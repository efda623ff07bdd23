//! One `key=value` setting, as every front end spells options (the agent's, a tier store's): how
//! values are read (numbers, counts, milliseconds, on/off) and written back, and the error that
//! names a bad one.

use std::time::Duration;

use crate::error::{Error, Result};

/// A setting's value as an option: `None` for one that is unset (no default).
pub(crate) type OptionValue = Option<String>;

pub(crate) fn switch(on: bool) -> String {
    (if on { "on" } else { "off" }).to_string()
}

pub(crate) fn millis(d: Duration) -> String {
    d.as_millis().to_string()
}

/// One `key=value` being applied, for the errors that name it.
pub(crate) struct Setting<'a> {
    pub key: &'a str,
    pub value: &'a str,
}

impl Setting<'_> {
    pub fn bad(&self, expected: &str) -> Error {
        Error::InvalidArgument(format!("option {}: {:?} is not {expected}", self.key, self.value))
    }

    pub fn number(&self) -> Result<u64> {
        self.value.parse::<u64>().map_err(|_| self.bad("a number"))
    }

    /// A count of at least 1.
    pub fn count(&self) -> Result<usize> {
        match self.value.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(self.bad("a number of at least 1")),
        }
    }

    /// Sockets and timers refuse a zero timeout, so zero would fail every connection later.
    pub fn millis(&self) -> Result<Duration> {
        match self.value.parse::<u64>() {
            Ok(n) if n > 0 => Ok(Duration::from_millis(n)),
            _ => Err(self.bad("a positive number of milliseconds")),
        }
    }

    pub fn switch(&self) -> Result<bool> {
        match self.value {
            "on" | "1" | "true" => Ok(true),
            "off" | "0" | "false" => Ok(false),
            _ => Err(self.bad("on or off")),
        }
    }
}
