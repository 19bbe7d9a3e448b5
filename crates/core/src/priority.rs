//! Thread priorities: work no one waits on live (a recording's beam search)
//! runs on threads at the lowest CPU priority, so the kernel gives live
//! work the cores first and the background what is left.

/// The nice value of background threads: the lowest. Under contention such
/// a thread gets about 1.5 % of a core against one at nice 0 (the kernel's
/// weights 15 and 1024), never nothing; on idle cores it gets all of them.
pub const BACKGROUND_NICE: i32 = 19;

/// Lowers the calling thread (not its process) to [`BACKGROUND_NICE`]. Any
/// thread may lower its own priority; on systems other than Linux this
/// does nothing.
pub fn lower_this_thread() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // On Linux a thread is a task of its own: PRIO_PROCESS with its id
        // sets that thread's nice value alone.
        #[allow(unsafe_code)]
        // SAFETY: gettid and setpriority take and return plain integers and
        // touch no memory of this process.
        let r = unsafe {
            libc::setpriority(
                libc::PRIO_PROCESS,
                libc::gettid() as libc::id_t,
                BACKGROUND_NICE,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A thread pool for work no one waits on live, as many threads as rayon's
/// global pool, each at [`BACKGROUND_NICE`], named `{name}-N`. Run such
/// work inside it ([`rayon::ThreadPool::install`]): the closure and every
/// parallel product it starts then run on these threads, so none of it
/// takes a core from live work on the global pool.
pub fn background_pool(
    name: &'static str,
) -> Result<rayon::ThreadPool, rayon::ThreadPoolBuildError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads())
        .thread_name(move |i| format!("{name}-{i}"))
        .start_handler(move |_| {
            if let Err(e) = lower_this_thread() {
                tracing::warn!(pool = name, error = %e, "a background thread keeps normal priority");
            }
        })
        .build()
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The nice value of thread `tid` of this process (field 19 of its stat).
    fn nice(tid: i32) -> i32 {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
            .expect("the thread's stat is readable");
        // The command name, in parentheses, may hold spaces: count after it.
        let after = &stat[stat.rfind(')').expect("a command name") + 2..];
        after
            .split(' ')
            .nth(16)
            .and_then(|v| v.parse().ok())
            .expect("a nice value")
    }

    #[test]
    fn a_background_thread_is_lowered_and_its_siblings_are_not() {
        #[allow(unsafe_code)]
        // SAFETY: gettid takes nothing and returns an integer.
        let me = unsafe { libc::gettid() };
        let before = nice(me);
        let (tid, lowered) = std::thread::spawn(|| {
            lower_this_thread().expect("a thread may lower itself");
            #[allow(unsafe_code)]
            // SAFETY: as above.
            let tid = unsafe { libc::gettid() };
            (tid, nice(tid))
        })
        .join()
        .expect("the thread ran");
        assert_ne!(tid, me);
        assert_eq!(lowered, BACKGROUND_NICE);
        assert_eq!(nice(me), before, "only the calling thread is lowered");
    }

    #[test]
    fn work_installed_in_the_background_pool_runs_lowered() {
        let pool = background_pool("test-bg").expect("a pool");
        let (name, lowered) = pool.install(|| {
            #[allow(unsafe_code)]
            // SAFETY: gettid takes nothing and returns an integer.
            let tid = unsafe { libc::gettid() };
            (std::thread::current().name().map(str::to_owned), nice(tid))
        });
        assert!(name.is_some_and(|n| n.starts_with("test-bg-")));
        assert_eq!(lowered, BACKGROUND_NICE);
    }
}
