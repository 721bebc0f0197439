//! The buildspec: the model of a `buildspec.yml` and the parser that fills it from text.

mod error;
pub mod model;
mod parse;
mod walk;
mod yaml;

pub use error::ParseError;
pub use model::*;
pub use parse::parse;
