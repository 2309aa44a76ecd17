//! Child processes that live no longer than their owner: the demo's and the benches' coordinators and
//! workers.

use std::process::Child;

/// A named set of child processes, killed and reaped when the set is dropped, however its owner ends (done,
/// an error, a panic): a demo or bench never leaves a coordinator or a worker running behind it.
#[derive(Default)]
pub struct Children(Vec<(String, Child)>);

impl Children {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `child` under `name` and returns it (for its pipes and its id).
    pub fn push(&mut self, name: impl Into<String>, child: Child) -> &mut Child {
        self.0.push((name.into(), child));
        &mut self.0.last_mut().expect("just pushed").1
    }

    /// Every child with its name, in the order they were added.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut Child)> {
        self.0.iter_mut().map(|(name, child)| (name.as_str(), child))
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn dropping_the_set_kills_and_reaps_every_child() {
        let mut children = Children::new();
        let pids: Vec<i32> = (0..2)
            .map(|i| children.push(format!("sleep-{i}"), Command::new("sleep").arg("60").spawn().unwrap()).id() as i32)
            .collect();
        let names: Vec<String> = children.iter_mut().map(|(name, _)| name.to_string()).collect();
        assert_eq!(names, ["sleep-0", "sleep-1"]);
        drop(children);
        for pid in pids {
            // Reaped, not a zombie: the pid no longer exists.
            // SAFETY: signal 0 only checks whether the process exists.
            assert_eq!(unsafe { libc::kill(pid, 0) }, -1, "process {pid} is still there");
        }
    }
}
