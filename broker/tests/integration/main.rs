//! Integration tests against real `herald` processes. One test binary with
//! modules, so linking stays fast.

mod auth;
mod cluster;
mod common;
mod exec;
mod external;
mod faults;
mod history;
mod hostile;
mod journal;
mod layering;
mod lifecycle;
mod limits;
mod presence;
mod pubsub;
mod raw;
mod rawstatus;
mod recovery;
mod status;
