package org.apache.spark.ml.ferry

import org.apache.spark.ml.param.Params
import org.apache.spark.ml.util.{DefaultParamsReader, DefaultParamsWriter}
import org.apache.spark.sql.SparkSession

/**
 * Spark ML's standard metadata file (class, uid, params) for ferry's models that also save data
 * of their own: Spark keeps its reader and writer package-private, and models must write the
 * same metadata as every other Spark ML stage so pipelines holding them save and load as usual.
 */
object ParamsPersistence {

  def saveMetadata(instance: Params, path: String, spark: SparkSession): Unit =
    DefaultParamsWriter.saveMetadata(instance, path, spark)

  /** The uid saved at `path`, checking the saved class is `expectedClass`. */
  def loadUid(path: String, spark: SparkSession, expectedClass: String): String =
    DefaultParamsReader.loadMetadata(path, spark, expectedClass).uid

  /** Sets `instance`'s params to those saved at `path`. */
  def loadParams(instance: Params, path: String, spark: SparkSession, expectedClass: String): Unit =
    DefaultParamsReader.loadMetadata(path, spark, expectedClass).getAndSetParams(instance)
}
