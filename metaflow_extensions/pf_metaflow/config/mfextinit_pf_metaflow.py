"""Metaflow configuration from pf-metaflow: teaches the Runner API the USDC Parameter type.

Metaflow copies every public name of this module into its configuration, so this
module defines exactly one: the extra Click-type -> Python-type mapping, through
which ``Runner(flow).run(total_budget_usdc=12)`` (an int, float, str or Decimal)
passes the Runner's type check.
"""


def get_click_to_python_types():
    from decimal import Decimal
    from typing import Union

    from pf_metaflow.params import UsdcParamType

    return {UsdcParamType: Union[str, int, float, Decimal]}
