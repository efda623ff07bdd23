//! The levels a block can live at: a leaf that errors, events and metrics name.

/// Where a block lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Medium {
    Gpu,
    Cpu,
    Disk,
    /// The level every engine shares: object storage or a shared directory.
    Remote,
}

impl Medium {
    pub const ALL: [Medium; 4] = [Medium::Gpu, Medium::Cpu, Medium::Disk, Medium::Remote];

    /// kvferry's name: the `tier` label of the metrics, what `lookup` answers in Python and C.
    pub fn as_str(self) -> &'static str {
        match self {
            Medium::Gpu => "GPU",
            Medium::Cpu => "CPU",
            Medium::Disk => "DISK",
            Medium::Remote => "REMOTE",
        }
    }

    /// The `medium` of vLLM's KV events (`MEDIUM_GPU`, `MEDIUM_CPU`, `MEDIUM_STORAGE` in
    /// `vllm/distributed/kv_events.py`): the one spelling every publisher of kvferry uses, the
    /// store's and the vLLM connector's (`kvferry.KV_EVENT_MEDIUM`).
    pub fn kv_event_name(self) -> &'static str {
        match self {
            Medium::Gpu => "GPU",
            Medium::Cpu => "CPU",
            Medium::Disk | Medium::Remote => "STORAGE",
        }
    }
}

impl std::fmt::Display for Medium {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
