"""Graph-to-graph passes (fusion, cache quantisation). The compile pipeline runs none yet:
artifacts hold the unfused reference graph, the baseline every later pass is checked against."""
