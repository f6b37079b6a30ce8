//! A subscription's `events` filter: exact names and globs (`*` any run, `?` one character).

/// A subscription's `events`, compiled once: the registry's index keeps one per
/// subscription, so routing a record builds no glob.
#[derive(Debug, Clone)]
pub struct EventFilter(Vec<Pattern>);

#[derive(Debug, Clone)]
enum Pattern {
    Any,
    Exact(String),
    Glob(wildmatch::WildMatch),
}

impl EventFilter {
    pub fn new(events: &[String]) -> Self {
        let compile = |p: &String| match p.as_str() {
            "*" => Pattern::Any,
            p if p.contains('*') || p.contains('?') => Pattern::Glob(wildmatch::WildMatch::new(p)),
            p => Pattern::Exact(p.to_string()),
        };
        Self(events.iter().map(compile).collect())
    }

    /// Whether `event_type` is one of the names or matches one of the globs.
    pub fn accepts(&self, event_type: &str) -> bool {
        self.0.iter().any(|p| match p {
            Pattern::Any => true,
            Pattern::Exact(name) => name == event_type,
            Pattern::Glob(glob) => glob.matches(event_type),
        })
    }
}
