"""Task data with no download: generators (`mqar`, `selective_copy`, `mlm`, `graphs`, `synthetic`,
`landmark`) and data that ships with Python or an installed package (`text`: standard-library
source; `images`: scikit-learn's digits). Import the submodules directly."""
