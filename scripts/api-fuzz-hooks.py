"""schemathesis hooks for scripts/api-fuzz (loaded through SCHEMATHESIS_HOOKS).

The fuzzer runs with one admin key of a throwaway tenant and calls every route, destructive ones
included. Revoking, rotating or deleting that very key would lock the rest of the run out (every
later request answering 401), so generated requests never name its id (FLEET_FUZZ_KEY_ID) as
`key_id`. Every other key id, existing or not, is still generated.
"""

import os

import schemathesis

OWN_KEY_ID = os.environ["FLEET_FUZZ_KEY_ID"]


@schemathesis.hook
def filter_path_parameters(context, path_parameters):
    return path_parameters is None or path_parameters.get("key_id") != OWN_KEY_ID
