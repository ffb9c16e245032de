package org.apache.spark.sql.ferry

import org.apache.spark.rdd.RDD
import org.apache.spark.sql.{DataFrame, SparkSession, classic}
import org.apache.spark.sql.catalyst.InternalRow
import org.apache.spark.sql.types.StructType

/**
 * DataFrames over RDDs of Catalyst rows. Spark keeps this constructor package-private; the
 * public `createDataFrame(RDD[Row], schema)` converts every row through an encoder, which cost
 * ferry's stages about a second per five million rows for values that already arrive from Arrow
 * in Catalyst form.
 */
object InternalFrames {
  def create(spark: SparkSession, rows: RDD[InternalRow], schema: StructType): DataFrame =
    spark.asInstanceOf[classic.SparkSession].internalCreateDataFrame(rows, schema)
}
