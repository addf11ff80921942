//! macOS: the system's memory-pressure dispatch source.
//!
//! `DISPATCH_SOURCE_TYPE_MEMORYPRESSURE` reports transitions between normal,
//! warn and critical; the level holds until the next transition, so every
//! wait reports the level the system is in. The headroom is not read here
//! (the kernel compresses memory long before it runs out, and its own levels
//! already say when that stops working); the controller then takes the
//! machine's memory as the limit.

use std::ffi::c_void;
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::Duration;

use super::{Headroom, Level, PressureSource};

type Object = *mut c_void;

const NORMAL: usize = 0x01;
const WARN: usize = 0x02;
const CRITICAL: usize = 0x04;

unsafe extern "C" {
    /// What `DISPATCH_SOURCE_TYPE_MEMORYPRESSURE` points to.
    static _dispatch_source_type_memorypressure: c_void;
    fn dispatch_get_global_queue(identifier: isize, flags: usize) -> Object;
    fn dispatch_source_create(
        kind: *const c_void,
        handle: usize,
        mask: usize,
        queue: Object,
    ) -> Object;
    fn dispatch_set_context(object: Object, context: *mut c_void);
    fn dispatch_source_set_event_handler_f(source: Object, handler: extern "C" fn(*mut c_void));
    fn dispatch_source_get_data(source: Object) -> usize;
    fn dispatch_resume(object: Object);
}

/// What the event handler needs; lives as long as the process.
struct Context {
    source: Object,
    levels: Mutex<Sender<Level>>,
}

extern "C" fn on_event(context: *mut c_void) {
    // SAFETY: the context is the leaked `Context` set on this source.
    let context = unsafe { &*(context as *const Context) };
    // SAFETY: the source is alive: it is never cancelled or released.
    let data = unsafe { dispatch_source_get_data(context.source) };
    let level = if data & CRITICAL != 0 {
        Level::Critical
    } else if data & WARN != 0 {
        Level::Warn
    } else {
        Level::Normal
    };
    if let Ok(levels) = context.levels.lock() {
        let _ = levels.send(level);
    }
}

/// The memory-pressure level as the system last reported it.
pub struct MacSource {
    levels: Mutex<(Receiver<Level>, Level)>,
}

impl MacSource {
    pub fn open() -> MacSource {
        let (sender, receiver) = channel();
        // SAFETY: plain libdispatch calls; the source and its context are kept
        // for the life of the process.
        unsafe {
            let queue = dispatch_get_global_queue(0, 0);
            let source = dispatch_source_create(
                &raw const _dispatch_source_type_memorypressure,
                0,
                NORMAL | WARN | CRITICAL,
                queue,
            );
            let context = Box::into_raw(Box::new(Context {
                source,
                levels: Mutex::new(sender),
            }));
            dispatch_set_context(source, context.cast());
            dispatch_source_set_event_handler_f(source, on_event);
            dispatch_resume(source);
        }
        MacSource {
            levels: Mutex::new((receiver, Level::Normal)),
        }
    }
}

impl PressureSource for MacSource {
    fn describe(&self) -> String {
        "the memory-pressure dispatch source".to_owned()
    }

    fn wait(&self, timeout: Duration) -> Option<(Level, String)> {
        let mut guard = self.levels.lock().ok()?;
        let (levels, current) = &mut *guard;
        match levels.recv_timeout(timeout) {
            Ok(level) => *current = level,
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
        }
        (*current != Level::Normal).then(|| {
            (
                *current,
                format!("the system reports {current} memory pressure"),
            )
        })
    }

    fn headroom(&self) -> Option<Headroom> {
        None
    }
}
