//! The build's shell sessions. In a 0.2 build every phase shares one shell; a phase with another
//! `run-as` user gets a new shell that starts from the previous shell's working directory and
//! exported variables; a shell that exits (`exit 1`, `set -e`) is replaced by a fresh one for
//! the commands after it.

use std::sync::Arc;

use sandbox::{Executor, OutputSink, RunAs, SandboxError, Session, SessionSpec};

use crate::users::User;

/// An output sink that drops everything: for peerbuild's own bookkeeping commands.
pub struct Discard;

impl OutputSink for Discard {
    fn write(&mut self, _bytes: &[u8]) {}
}

/// What happened to the shell state when a session was (re)started.
#[derive(Debug, PartialEq, Eq)]
pub enum Handover {
    /// The same session goes on.
    Kept,
    /// The first session of the build.
    Started,
    /// A new session for another user, carrying the directory and exported variables.
    Switched { from: String, to: String },
    /// The previous shell had exited; the new one starts afresh.
    Restarted,
}

struct Current {
    user: String,
    session: Box<dyn Session>,
    alive: bool,
}

/// The sessions of one build.
pub struct Sessions {
    executor: Arc<dyn Executor>,
    spec: SessionSpec,
    /// The user peerbuild runs as: sessions for this user need no identity change.
    me: User,
    current: Option<Current>,
    succeeding: bool,
    /// Shell state the first session applies when it starts (see [`Sessions::elsewhere`]).
    initial: Option<String>,
}

impl Sessions {
    pub fn new(executor: Arc<dyn Executor>, spec: SessionSpec, me: User) -> Self {
        Sessions {
            executor,
            spec,
            me,
            current: None,
            succeeding: true,
            initial: None,
        }
    }

    /// Sessions of another executor for the same build (a phase in another sandbox), whose
    /// first session starts by applying `initial` (`export` lines, and a `cd` for a shell).
    pub fn elsewhere(&self, executor: Arc<dyn Executor>, initial: String) -> Sessions {
        Sessions {
            executor,
            spec: self.spec.clone(),
            me: self.me.clone(),
            current: None,
            succeeding: self.succeeding,
            initial: Some(initial),
        }
    }

    /// The session for `user` (`None`: peerbuild's own user), starting or switching as needed.
    pub async fn get(
        &mut self,
        user: Option<&User>,
    ) -> Result<(&mut dyn Session, Handover), SandboxError> {
        let wanted = user.unwrap_or(&self.me).clone();
        let handover = match &self.current {
            Some(current) if current.alive && current.user == wanted.name => Handover::Kept,
            Some(current) if current.alive => Handover::Switched {
                from: current.user.clone(),
                to: wanted.name.clone(),
            },
            Some(_) => Handover::Restarted,
            None => Handover::Started,
        };
        if handover != Handover::Kept {
            let carried = match handover {
                Handover::Switched { .. } => self.snapshot().await,
                Handover::Started => self.initial.clone(),
                _ => None,
            };
            if let Some(mut old) = self.current.take() {
                old.session.terminate().await?;
            }
            let session = self.start(&wanted, carried).await?;
            self.current = Some(Current {
                user: wanted.name.clone(),
                session,
                alive: true,
            });
        }
        let current = self.current.as_mut().ok_or(SandboxError::Ended)?;
        Ok((current.session.as_mut(), handover))
    }

    /// Notes that the current shell exited while running a command.
    pub fn shell_exited(&mut self) {
        if let Some(current) = &mut self.current {
            current.alive = false;
        }
    }

    /// Sets `CODEBUILD_BUILD_SUCCEEDING=0` in the running shell and in every later one.
    pub async fn mark_failed(&mut self) -> Result<(), SandboxError> {
        self.succeeding = false;
        if let Some(current) = self.current.as_mut().filter(|c| c.alive) {
            current
                .session
                .apply("export CODEBUILD_BUILD_SUCCEEDING=0", &mut Discard)
                .await?;
        }
        Ok(())
    }

    /// Ends the current session, killing everything it started.
    pub async fn close(&mut self) -> Result<(), SandboxError> {
        match self.current.take() {
            Some(mut current) => current.session.terminate().await,
            None => Ok(()),
        }
    }

    /// The working directory and exported variables of the running shell, as shell code that
    /// recreates them.
    async fn snapshot(&mut self) -> Option<String> {
        let current = self.current.as_mut()?;
        let cwd = current.session.capture("pwd", &mut Discard).await.ok()?;
        let exports = current
            .session
            .capture("export -p", &mut Discard)
            .await
            .ok()?;
        Some(format!(
            "{}\ncd -- {} 2>/dev/null || true\n",
            exports.stdout,
            quote(&cwd.stdout)
        ))
    }

    async fn start(
        &self,
        user: &User,
        carried: Option<String>,
    ) -> Result<Box<dyn Session>, SandboxError> {
        let mut spec = self.spec.clone();
        for (name, value) in &mut spec.env {
            match name.as_str() {
                "HOME" => *value = user.home.clone(),
                "USER" | "LOGNAME" => *value = user.name.clone(),
                "CODEBUILD_BUILD_SUCCEEDING" => *value = (self.succeeding as u8).to_string(),
                _ => {}
            }
        }
        if user.uid != self.me.uid {
            spec.run_as = Some(RunAs {
                uid: user.uid,
                gid: user.gid,
                groups: user.groups.clone(),
            });
        }
        let mut session = self.executor.start(&spec).await?;
        if let Some(state) = carried {
            // The carried variables include the previous user's identity; the new user's wins.
            let script = format!(
                "{state}\nexport HOME={} USER={} LOGNAME={} CODEBUILD_BUILD_SUCCEEDING={}\n",
                quote(&user.home),
                quote(&user.name),
                quote(&user.name),
                self.succeeding as u8
            );
            session.apply(&script, &mut Discard).await?;
        }
        Ok(session)
    }
}

/// Quotes `text` for the shell: single quotes, with embedded single quotes spliced in.
pub fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::quote;

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote(""), "''");
    }
}
