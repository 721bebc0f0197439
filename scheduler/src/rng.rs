//! A tiny seeded random number generator (SplitMix64) for the simulator and the random-placement
//! baseline: no dependency, and the same seed always gives the same sequence on every platform.

/// SplitMix64 (Steele, Lea and Flood): one add and three mixes per number; passes BigCrush,
/// which is far more than a simulator needs.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..bound` (`bound` must be positive). The modulo bias is below 2^-40 for the
    /// small bounds used here.
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }

    /// A number in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high - low + 1)
    }

    /// True with probability `percent` in 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// A fresh generator for a sub-component, so adding draws in one place does not shift every
    /// other part of a simulation.
    pub fn fork(&mut self) -> Rng {
        Rng::new(self.next_u64())
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;

    #[test]
    fn the_same_seed_gives_the_same_sequence() {
        let a: Vec<u64> = {
            let mut rng = Rng::new(7);
            (0..4).map(|_| rng.below(1000)).collect()
        };
        let mut rng = Rng::new(7);
        let b: Vec<u64> = (0..4).map(|_| rng.below(1000)).collect();
        assert_eq!(a, b);
        assert_ne!(Rng::new(8).next_u64(), Rng::new(7).next_u64());
    }
}
