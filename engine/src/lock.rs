//! Taking a lock whatever a panic left behind.

/// A lock's guard, even when a thread panicked holding it. One policy across the engine and the
/// daemon: a panic is a bug to report, but it must not turn every later request into a second
/// panic. Every lock taken through this keeps its data consistent between any two statements
/// that change it (the store's books change only through `BudgetCache`, whose every method
/// leaves them whole before returning), so a guard a panic left behind is still valid.
pub fn recover<G>(result: std::sync::LockResult<G>) -> G {
    result.unwrap_or_else(std::sync::PoisonError::into_inner)
}
